"""Setting up a run folder: the plan from the sites' fingerprints, plans.json and round_000.

The same calls serve `fedseg simulate`, `fedseg flower simulate` and the Flower coordinator,
so every way of running a federation plans (and resumes) alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseg.atomic import json_safe
from fedseg.errors import InputError
from fedseg.federation.round_zero import initial_round
from fedseg.federation.plan_building import build_plans
from fedseg.federation.privacy import ensure_site_keys, plan_privacy
from fedseg.federation.privacy_params import parse_privacy
from fedseg.federation.run_folder import round_dir
from fedseg.federation.secure_aggregation import load_agreement_key
from fedseg.federation.strategies import get_strategy
from fedseg.planning.planner import split_overrides
from fedseg.planning.plans import Plans, load_plans

KEYS_DIR = "keys"


def as_stored(fingerprint: dict) -> dict:
    """The fingerprint exactly as reading its file back gives it (tuples as lists, NaN as null),
    so that a run planned before its fingerprints are written and a resumed run that reads
    them plan from the same values (and get the same plan_id)."""
    return json.loads(json.dumps(json_safe(fingerprint), allow_nan=False))


def check_overrides(strategy: str, overrides: dict[str, str]) -> None:
    """Refuse an unknown strategy or a `--set` that the plan would refuse, before any work
    (keys, types and ranges; what depends on the sites' data is checked by `plan_run`)."""
    impl = get_strategy(strategy)
    _training, _configuration, params, _seed = split_overrides(overrides)
    impl.check_params(params)


def plan_run(
    fingerprints: list[dict],
    *,
    strategy: str,
    rounds: int,
    configuration: str,
    iterations: int | None,
    overrides: dict[str, str],
    seed: int,
    keys: dict[str, str] | None = None,
    budget: float | None = None,
) -> Plans:
    """The run's plan from the sites' fingerprints (`build_plans`, as `fedseg plan` makes it), with
    --rounds and --iterations as plan values; writes nothing."""
    overrides = dict(overrides)
    _option_into_plan(overrides, "training.rounds", rounds, "--rounds")
    if iterations is not None:
        _option_into_plan(overrides, "training.iterations_per_round", iterations, "--iterations")
    return build_plans(fingerprints, strategy=strategy, configuration=configuration, overrides=overrides, seed=seed,
                       budget=budget, keys=keys or None)


def init_run(run_dir: Path, plans: Plans, log: Callable[[str], None] = lambda message: None, signing_key=None) -> Plans:
    """Write run_dir/plans.json (or check that the one there is the same plan) and round_000.

    Run again on the same folder (resume), the plan must come out the same; `signing_key`
    signs round_000. With secure aggregation the sites' key pairs are made in run_dir/keys.
    """
    plans = plan_privacy(plans, get_strategy(plans.strategy.name), privacy_keys(run_dir, plans))
    plans_path = Path(run_dir) / "plans.json"
    if plans_path.is_file():
        existing = load_plans(plans_path)
        if existing.plan_id != plans.plan_id:
            differences = plan_differences(existing.content_dict(), plans.content_dict())
            raise InputError(
                f"holds a different plan (differs at {', '.join(differences[:5])}"
                f"{', ...' if len(differences) > 5 else ''}); resume with the options of that run, "
                "or use a new run folder", plans_path,
            )
    else:
        plans.save(plans_path)
    for note in plans.extra.get("planning", {}).get("notes", []):
        log(f"plan: {note}")
    log(f"plan {plans.plan_id[:12]}: {len(plans.sites)} sites, strategy {plans.strategy.name}, "
        f"{plans.training.rounds} round(s), configuration {plans.default_configuration}")
    # idempotent: a complete round 0 of this plan is kept, a damaged or missing one rewritten
    # (bit for bit the same: it is built from the plan's seed)
    initial_round(plans, round_dir(run_dir, 0), seed=plans.seed, signing_key=signing_key)
    return plans


def plan_and_init(
    run_dir: Path,
    fingerprints: list[dict],
    *,
    strategy: str,
    rounds: int,
    configuration: str,
    iterations: int | None,
    overrides: dict[str, str],
    seed: int,
    log: Callable[[str], None] = lambda message: None,
    keys: dict[str, str] | None = None,
    signing_key=None,
    budget: float | None = None,
) -> Plans:
    """Plan from the sites' fingerprints into run_dir/plans.json and write round_000 (`plan_run`
    then `init_run`); `keys` (site -> public key) make the plan require signed files."""
    plans = plan_run(fingerprints, strategy=strategy, rounds=rounds, configuration=configuration,
                     iterations=iterations, overrides=overrides, seed=seed, keys=keys, budget=budget)
    return init_run(run_dir, plans, log=log, signing_key=signing_key)


def privacy_keys(run_dir: Path, plans: Plans) -> Path | None:
    """With secure aggregation, the sites' key pairs in RUN_DIR/keys (made on first use)."""
    if not parse_privacy(plans.strategy.params).secure_aggregation:
        return None
    return ensure_site_keys(Path(run_dir) / KEYS_DIR, sorted(plans.sites))


def agreement_key(run_dir: Path, plans: Plans, site: str):
    """The site's key-agreement key from RUN_DIR/keys, when the plan uses secure aggregation."""
    folder = privacy_keys(run_dir, plans)
    return None if folder is None else load_agreement_key(folder / f"{site}.key")


def plan_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two plans' content differs (e.g. "training.rounds: 3 -> 2")."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(f"{where} ({'added' if key not in old else 'removed'})")
            else:
                out.extend(plan_differences(old[key], new[key], where))
        return out
    if old != new:
        short = all(isinstance(v, (int, float, str, bool, type(None))) and len(str(v)) <= 40 for v in (old, new))
        return [f"{path}: {old!r} -> {new!r}" if short else path]
    return []


def _option_into_plan(overrides: dict[str, str], key: str, value: int, flag: str) -> None:
    """One rule for options that are also plan values: the option goes into the plan; the same key
    in --set must then say the same, else the run would follow one and the plan the other."""
    given = overrides.get(key)
    if given is not None and str(given).strip() != str(value):
        raise InputError(f"{flag} {value} and --set {key}={given} disagree; give one of them (or the same value)")
    overrides[key] = str(value)

"""Round 0: every site's initial model, built from the plan's seed (or from given weights).

The only part of the protocol at the coordinator that builds networks (torch, through the
strategy's model recipe, fedseg.training.recipes); `fedseg aggregate` never imports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedseg.errors import InputError
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.round_commit import (
    INIT_RECORD,
    check_output_folder,
    check_round_number,
    damaged_files,
    finish_commit,
    read_record,
    record_files,
    staged_round,
)
from fedseg.federation.round_outputs import MODELS_DIR
from fedseg.federation.routes import route_table
from fedseg.federation.signing import COORDINATOR, SigningKey, require_signing_key
from fedseg.federation.site_update import write_signed
from fedseg.federation.strategies import get_strategy
from fedseg.federation.weightfile import WeightMeta, describe
from fedseg.folder_lock import folder_lock
from fedseg.training.recipes.registry import get_recipe

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


def initial_round(
    plans: Plans, out_dir: str | Path, seed: int | None = None, signing_key: SigningKey | None = None,
    replace: bool = False,
    start_state: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """Write round_000: `<site>.safetensors` (the FULL initial state, local tensors included,
    so a site can start without building anything), `models/<pool>.safetensors` and the
    commit record `init.json`. Signed with the coordinator's `signing_key` (required when the
    plan lists public keys).

    One network per configuration, built with the seed; every tensor of a (pool, key) is then
    taken from the first site (in name order) that holds it, so all sites of a pool start
    from bit-identical shared weights even when their configurations differ.

    `start_state` (e.g. a pretrained nnU-Net model, fedseg.federation.nnunet_import) replaces
    the seeded weights; it must hold exactly the network's tensors with their shapes.

    Like `aggregate_round`: committed as a whole under the folder's lock; a complete round 0
    of the same plan, seed and starting weights is left as it is, another one is refused
    unless `replace`.
    """
    out_dir = Path(out_dir)
    seed = plans.seed if seed is None else int(seed)
    check_output_folder(out_dir)
    start = None if start_state is None else _start_digest(start_state)
    with folder_lock(out_dir, "round folder"):
        return _initial_locked(plans, out_dir, seed, signing_key, replace, start_state, start)


def _start_digest(start_state: Mapping[str, np.ndarray]) -> str:
    """sha256 over the starting weights (names, shapes, dtypes, bytes): round 0's record says
    which start it was built from, so another start is not mistaken for the same round."""
    digest = hashlib.sha256()
    for name in sorted(start_state):
        array = np.ascontiguousarray(start_state[name])
        digest.update(f"{name}|{array.shape}|{array.dtype.name}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _existing_initial_round(plans: Plans, out_dir: Path, seed: int, replace: bool, start: str | None) -> list[Path] | None:
    check_round_number(out_dir, 0, INIT_RECORD)
    finish_commit(out_dir)
    found = read_record(out_dir)
    if found is None:
        return None
    record = found[1]
    if record.get("plan_id") == plans.plan_id and record.get("seed") == seed and record.get("start") == start:
        if not damaged_files(out_dir, record):
            return [out_dir / rel for rel in record_files(record) if rel.endswith(".safetensors")]
        return None   # the same round 0, damaged: written again (the same bytes, from the seed)
    if not replace:
        raise InputError(
            f"already holds a round 0 of another plan, seed or start (plan_id {str(record.get('plan_id'))[:12]}…, seed "
            f"{record.get('seed')}); pass --replace to replace it, or choose a new folder",
            out_dir / INIT_RECORD,
        )
    return None


def _initial_locked(
    plans: Plans, out_dir: Path, seed: int, signing_key: SigningKey | None, replace: bool,
    start_state: Mapping[str, np.ndarray] | None, start: str | None,
) -> list[Path]:
    existing = _existing_initial_round(plans, out_dir, seed, replace, start)
    if existing is not None:
        return existing
    strategy = get_strategy(plans.strategy.name)
    strategy.check_params(plans.strategy.params)
    signing_key = require_signing_key(plans.keys, signing_key, COORDINATOR)
    states = strategy.initial_states(plans, _seeded_states(plans, seed, start_state))
    pooled, scopes = _pool_initial_tensors(plans, states)
    written: list[str] = []
    with staged_round(out_dir) as stage:
        for site in sorted(plans.sites):
            meta = WeightMeta(
                kind="model", plan_id=plans.plan_id, strategy=plans.strategy.name, site=site, round=0,
                n_cases=plans.sites[site].n_cases, n_iterations=0, scopes=scopes[site], extra={"seed": seed},
            )
            written.append(f"{site}.safetensors")
            write_signed(stage.path(written[-1]), states[site], meta, signing_key)
        table = route_table(plans)
        for pool in table.model_pools():
            tensors = {key: arr for (p, key), arr in pooled.items() if p == pool}
            meta = WeightMeta(
                kind="model", plan_id=plans.plan_id, strategy=plans.strategy.name, site=pool, round=0,
                n_cases=0, n_iterations=0, scopes={k: pool for k in tensors}, extra={"seed": seed},
            )
            written.append(f"{MODELS_DIR}/{table.pools[pool].model}.safetensors")
            write_signed(stage.path(written[-1]), tensors, meta, signing_key)
        record = {"round": 0, "plan_id": plans.plan_id, "strategy": plans.strategy.name, "seed": seed}
        if start is not None:
            record["start"] = start   # sha256 of the starting weights (e.g. an nnU-Net checkpoint)
        stage.commit(INIT_RECORD, record)
    return [out_dir / rel for rel in written]


def _seeded_states(plans: Plans, seed: int, start_state: Mapping[str, np.ndarray] | None) -> dict[str, dict[str, np.ndarray]]:
    """{site: {name: array}}: one network per configuration, built by the recipe with `seed`
    (or given `start_state`), checked against the plan's manifest."""
    recipe = get_recipe(get_strategy(plans.strategy.name).recipe)
    built: dict[str, dict[str, np.ndarray]] = {}
    states: dict[str, dict[str, np.ndarray]] = {}
    for site in sorted(plans.sites):
        config = plans.sites[site].configuration or plans.default_configuration
        if config not in built:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                network = recipe.network(plans, site)
            state = {k: v.detach().cpu().numpy().copy() for k, v in network.state_dict().items()}
            if start_state is not None:
                state = _pretrained_state(state, start_state)
            _check_manifest(plans, site, config, state)
            built[config] = state
        states[site] = dict(built[config])
    return states


def _check_manifest(plans: Plans, site: str, config: str, state: Mapping[str, np.ndarray]) -> None:
    expected = expected_parameters(plans, site)
    got = {k: (tuple(v.shape), v.dtype.name) for k, v in state.items()}
    if got != expected:
        differs = set(got) ^ set(expected) or {k for k in got if got[k] != expected.get(k)}
        raise InputError(
            f"the network built for configuration {config!r} does not match the plan's manifest "
            f"(differs at {describe(differs)}); re-run `fedseg plan`"
        )


def _pool_initial_tensors(
    plans: Plans, states: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, dict[str, str]]]:
    """Make every (pool, key) start bit-identical at all its sites: the first site (in name
    order) that holds it gives the tensor. Returns the pooled tensors and each site's scopes."""
    table = route_table(plans)
    pooled: dict[tuple[str, str], np.ndarray] = {}
    scopes: dict[str, dict[str, str]] = {}
    for site in sorted(plans.sites):
        sent = table.sent(site)
        scopes[site] = {}
        for name in states[site]:
            route = sent.get(name)
            if route is None:
                continue
            states[site][name] = pooled.setdefault((route.pool, route.key), states[site][name])
            scopes[site][name] = route.pool
    return pooled, scopes


def _pretrained_state(built: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`start` in the built network's tensor order and dtypes; any name or shape difference is refused."""
    if set(built) != set(start):
        raise InputError(f"the starting weights do not match the plan's network (differs at {describe(set(built) ^ set(start))})")
    out = {}
    for name, array in built.items():
        given = np.asarray(start[name])
        if given.shape != array.shape:
            raise InputError(f"starting weight {name!r} is {list(given.shape)}, the plan's network has {list(array.shape)}")
        out[name] = given.astype(array.dtype, copy=True)
    return out

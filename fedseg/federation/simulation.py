"""A whole federation on one machine, through the same library calls as the shell pipeline.

Run folder (ARCHITECTURE.md §6): plans.json, fingerprints/, round_000/, round_r/updates/,
round_r/<site>.safetensors, round_r/models/, round_r/aggregate.json, state/<site>/, report/.
A round is complete when its commit record (round_000/init.json, round_r/aggregate.json)
lists its outputs with their sha256. Started again on the same folder, a simulation checks the
chain of rounds (each round's updates started from the previous round's outputs, by sha256;
each record's files are intact) and redoes everything from the first round that is not
complete or not linked, discarding the rounds after it and putting each site's state back to
where that round started (state/<site>/before_round/<r>/).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError
from fedseg.federation.round_commit import (
    AGGREGATE_RECORD,
    damaged_files,
    finish_commit,
    read_record,
    record_files,
    round_number_of,
)
from fedseg.federation.server_eval import SERVER_TEST_DIR, evaluate_server_models, is_server_test_set
from fedseg.federation.site_training import STARTED_FROM
from fedseg.training.site_state import restore_site_state
from fedseg.federation.weightfile import open_weight_file, sha256_file
from fedseg.folder_lock import folder_lock
from fedseg.names import check_site_name, path_inside

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


@dataclass
class SimulationConfig:
    sites_root: Path
    strategy: str
    rounds: int
    run_dir: Path
    configuration: str = "3d_fullres"
    iterations: int | None = None          # iterations per round (default: the plan's)
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 1234
    workers: int = 2                       # augmentation workers per site
    fingerprint_workers: int = 1
    device: str = "auto"                   # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
    mirror: bool = False
    max_voxels: int = DEFAULT_MAX_VOXELS   # images declaring more voxels are refused unread
    budget: float | None = None            # planning budget (nnU-Net GB-equivalents; default the planner's)
    fold: int | str = 0                    # cross-validation fold every site trains on


@dataclass
class SimulationResult:
    run_dir: str
    plan_id: str
    rounds: int
    val_dice: dict[str, list[float | None]]          # site -> per round
    test_metrics: dict[str, dict]                    # site -> evaluate_folders result (means)
    report_dir: str
    server_metrics: dict = field(default_factory=dict)   # server_eval summary (empty without a server test set)
    traffic: dict = field(default_factory=dict)          # site -> per round {"upload", "download"} bytes


NOT_COMPLETE = "not complete"


def round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round_{r:03d}"


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """Refuse to run into a folder that already holds files unless the caller resumes it.

    `simulate` continues whatever run it finds (complete rounds are skipped); the CLI asks
    for an explicit --resume so that a mistyped -o never mixes two runs, and a resume of a
    folder that is not a run says so.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("run folder exists and is not a folder", run_dir)
    has_files = run_dir.is_dir() and any(run_dir.iterdir())
    if has_files and not resume:
        raise InputError("run folder already holds files; pass --resume to continue that run, or choose a new folder", run_dir)
    if resume and has_files and not (run_dir / "plans.json").is_file():
        raise InputError("--resume: this folder holds files but no plans.json, so it is not a fedseg run", run_dir)


def discover_sites(sites_root: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """The site folders under `sites_root` (sub-folders with a dataset.json); `log` hears which
    other sub-folders were skipped, so a site missing its dataset.json is not dropped silently."""
    if not sites_root.is_dir():
        raise InputError("sites folder not found", sites_root)
    # Folders whose name starts with "_" are not sites (e.g. `_server_test`, the server's test set).
    folders = sorted(p for p in sites_root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    sites = [p for p in folders if (p / "dataset.json").is_file()]
    skipped = [p.name for p in folders if p not in sites]
    if skipped and log is not None:
        log(f"skipped {len(skipped)} folder(s) of {sites_root} without a dataset.json: {', '.join(skipped)}")
    if not sites:
        raise InputError("no site folders (sub-folders with a dataset.json) inside", sites_root)
    for site in sites:   # a folder's name becomes the site's name, and file names from it
        check_site_name(site.name, site, what="site folder name")
    return sites


def simulate(
    config: SimulationConfig,
    log: Callable[[str], None] = lambda message: None,
    progress_factory: Callable | None = None,
) -> SimulationResult:
    """Run fingerprint -> plan -> init -> rounds of train/aggregate -> predict -> evaluate."""
    from fedseg.data.dataset import load_dataset
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.privacy import check_budget_before_round
    from fedseg.federation.site_training import run_site_round
    from fedseg.training.site_state import snapshot_site_state
    from fedseg.planning.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint

    run_dir = Path(config.run_dir)
    site_dirs = {p.name: p for p in discover_sites(Path(config.sites_root), log)}
    check_overrides(config.strategy, config.overrides)   # a bad strategy or --set fails before any work
    for path in site_dirs.values():  # so does an oversized image, at any site (headers only)
        check_site_image_sizes(load_dataset(path), config.max_voxels)
    progress_factory = progress_factory or _no_progress

    # 1. fingerprints, one per site (reused when present); written only once the plan made
    # from them is valid, so a refused --set leaves the run folder as it was
    fingerprints = []
    fresh: dict[Path, dict] = {}
    for name, path in site_dirs.items():
        fp_path = path_inside(run_dir / "fingerprints", f"{name}.json")
        if fp_path.is_file():
            fingerprints.append(load_fingerprint(fp_path))
            continue
        dataset = load_dataset(path)
        with progress_factory(f"fingerprint {name}", len(dataset.cases("Tr"))) as advance:
            fp = compute_fingerprint(dataset, name, workers=config.fingerprint_workers, progress=advance,
                                     max_voxels=config.max_voxels)
        fresh[fp_path] = as_stored(fp)
        fingerprints.append(fresh[fp_path])

    # 2. plan, 3. init
    plans = plan_run(
        fingerprints, strategy=config.strategy, rounds=config.rounds, configuration=config.configuration,
        iterations=config.iterations, overrides=config.overrides, seed=config.seed, budget=config.budget,
    )
    for fp_path, fp in fresh.items():
        save_fingerprint(fp, fp_path)
    plans = init_run(run_dir, plans, log=log)

    # 4. rounds, from the first one that is not complete and linked to the one before
    first = first_round_to_redo(run_dir, config.rounds, log)
    if first <= config.rounds:
        discard_rounds_from(run_dir, first, list(site_dirs), log)
    val_dice: dict[str, list[float | None]] = {name: [] for name in site_dirs}
    for r in range(1, config.rounds + 1):
        rdir = round_dir(run_dir, r)
        if r < first:
            collect_val_dice(rdir, val_dice)
            log(f"round {r}: already complete, skipped")
            continue
        check_budget_before_round(plans, round_dir(run_dir, r - 1), r)
        updates = []
        for name, path in site_dirs.items():
            update = path_inside(rdir / "updates", f"{name}.safetensors")
            snapshot_site_state(path_inside(run_dir / "state", name), r)
            with progress_factory(f"round {r}/{config.rounds} train {name}", config.iterations or plans.training.iterations_per_round) as advance:
                result = run_site_round(
                    plans, name, path, round_dir(run_dir, r - 1) / f"{name}.safetensors", run_dir / "state" / name,
                    update, iterations=config.iterations, device=config.device, num_workers=config.workers,
                    progress=advance, agreement_key=agreement_key(run_dir, plans, name),
                    max_voxels=config.max_voxels, fold=config.fold,
                )
            log(f"round {r} {name}: val Dice {result.val_dice:.3f} ({result.seconds:.1f}s)")
            updates.append(update)
        aggregate_round(plans, updates, rdir)
        collect_val_dice(rdir, val_dice)

    # 5. test: every site predicts its own test split with the model it would use
    test_metrics = evaluate_sites(plans, run_dir, site_dirs, config, progress_factory)
    traffic = collect_traffic(run_dir, config.rounds, list(site_dirs))
    report_dir = write_report(run_dir, plans.plan_id, val_dice, test_metrics, plans.labels, traffic=traffic)
    # 6. the server models (models/<pool>.safetensors) on SITES_ROOT/_server_test, if there is one
    server_metrics = {}
    server_dir = Path(config.sites_root) / SERVER_TEST_DIR
    if is_server_test_set(server_dir):
        server_metrics = evaluate_server_models(
            plans, round_dir(run_dir, config.rounds), server_dir, report_dir, state_root=run_dir / "state",
            device=config.device, mirror=config.mirror, progress_factory=progress_factory,
        )
    return SimulationResult(str(run_dir), plans.plan_id, config.rounds, val_dice, test_metrics, str(report_dir),
                            server_metrics, traffic=traffic)


def as_stored(fingerprint: dict) -> dict:
    """The fingerprint exactly as reading its file back gives it (tuples as lists, NaN as null),
    so that a run planned before its fingerprints are written and a resumed run that reads
    them plan from the same values (and get the same plan_id)."""
    import json

    from fedseg.atomic import json_safe

    return json.loads(json.dumps(json_safe(fingerprint), allow_nan=False))


def check_overrides(strategy: str, overrides: dict[str, str]) -> None:
    """Refuse an unknown strategy or a `--set` that the plan would refuse, before any work
    (keys, types and ranges; what depends on the sites' data is checked by `plan_run`)."""
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.planner import split_overrides

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
    from fedseg.federation.plan_building import build_plans

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
    from fedseg.federation.round_zero import initial_round
    from fedseg.federation.privacy import plan_privacy
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.plans import load_plans

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


def simulate_folds(
    config: SimulationConfig,
    folds: list[int | str],
    log: Callable[[str], None] = lambda message: None,
    progress_factory: Callable | None = None,
) -> dict[str, SimulationResult]:
    """One federation per cross-validation fold, each in `run_dir/fold_<k>/` (nnU-Net's fold
    folders), all under the same plan. The sites' fingerprints are computed once and copied
    into the later folds' run folders. Returns fold folder name -> result."""
    import shutil

    from fedseg.training.folds import fold_name

    results: dict[str, SimulationResult] = {}
    first: Path | None = None
    for fold in folds:
        name = fold_name(fold)
        run_dir = Path(config.run_dir) / name
        if first is not None and not (run_dir / "fingerprints").is_dir():
            shutil.copytree(first / "fingerprints", run_dir / "fingerprints")
        log(f"{name}: federation of fold {fold}")
        results[name] = simulate(dataclasses.replace(config, run_dir=run_dir, fold=fold), log, progress_factory)
        first = first or run_dir
    return results


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


def first_round_to_redo(run_dir: Path, rounds: int, log: Callable[[str], None] = lambda message: None) -> int:
    """The first round (1..rounds) that is not complete and linked to the round before it;
    rounds + 1 when every round is. Round 0 is checked by `plan_and_init`."""
    previous = read_record(round_dir(run_dir, 0))
    for r in range(1, rounds + 1):
        problem = round_chain_problem(run_dir, r, previous[1] if previous else None)
        if problem is not None:
            if problem != NOT_COMPLETE or any(round_dir(run_dir, k).exists() for k in range(r + 1, rounds + 1)):
                log(f"round {r}: {problem}")
            return r
        previous = read_record(round_dir(run_dir, r))
    return rounds + 1


def round_chain_problem(run_dir: Path, r: int, previous: dict | None) -> str | None:
    """Why round r cannot be trusted as the successor of `previous` (its record); None when it can."""
    rdir = round_dir(run_dir, r)
    with folder_lock(rdir, "round folder"):
        finish_commit(rdir)
    found = read_record(rdir)
    if found is None or found[0] != AGGREGATE_RECORD:
        return NOT_COMPLETE
    record = found[1]
    if record.get("round") != r:
        return f"its aggregate.json is of round {record.get('round')}"
    damaged = damaged_files(rdir, record)
    if damaged:
        return f"output(s) changed after the round was written: {', '.join(damaged[:3])}"
    previous_files = record_files(previous) if previous is not None else {}
    for item in record.get("inputs", []):
        site = item.get("site")
        update = path_inside(rdir / "updates", f"{site}.safetensors")
        if not update.is_file() or sha256_file(update) != item.get("sha256"):
            return f"the update of site {site} is not the one aggregate.json records"
        with open_weight_file(update) as reader:
            started_from = reader.meta.extra.get(STARTED_FROM)
        if started_from is None or started_from != previous_files.get(f"{site}.safetensors"):
            return f"site {site}'s update did not start from round {r - 1}'s {site}.safetensors"
    return None


def discard_rounds_from(run_dir: Path, first: int, sites: list[str], log: Callable[[str], None] = lambda message: None) -> None:
    """Remove round folders first.. and put each site's state back to where round `first` started."""
    import shutil

    later = sorted(p for p in run_dir.glob("round_*") if (round_number_of(p) or 0) >= first)
    # a round interrupted before its commit is simply redone; anything beyond it is said aloud
    if any(round_number_of(p) != first or read_record(p) is not None for p in later):
        log(f"redoing from round {first}: discarding {', '.join(p.name for p in later)}")
    for folder in later:
        shutil.rmtree(folder)
    for site in sites:
        restore_site_state(path_inside(run_dir / "state", site), first)


KEYS_DIR = "keys"


def privacy_keys(run_dir: Path, plans: Plans) -> Path | None:
    """With secure aggregation, the sites' key pairs in RUN_DIR/keys (made on first use)."""
    from fedseg.federation.privacy import ensure_site_keys
    from fedseg.federation.privacy_params import parse_privacy

    if not parse_privacy(plans.strategy.params).secure_aggregation:
        return None
    return ensure_site_keys(Path(run_dir) / KEYS_DIR, sorted(plans.sites))


def agreement_key(run_dir: Path, plans: Plans, site: str):
    """The site's key-agreement key from RUN_DIR/keys, when the plan uses secure aggregation."""
    from fedseg.federation.secure_aggregation import load_agreement_key

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


def collect_val_dice(rdir: Path, val_dice: dict[str, list[float | None]]) -> None:
    """Append each site's validation Dice of round `rdir` (from its update's metadata; None when absent)."""
    from fedseg.federation.weightfile import open_weight_file

    for name in val_dice:
        update = rdir / "updates" / f"{name}.safetensors"
        value = None
        if update.is_file():
            with open_weight_file(update) as reader:   # metadata only
                value = reader.meta.extra.get("val_dice")
        val_dice[name].append(value)


def collect_traffic(run_dir: Path, rounds: int, sites: list[str]) -> dict[str, list[dict[str, int] | None]]:
    """Bytes each site sent (its update) and received (its next model file) per round, from aggregate.json."""
    import json

    traffic: dict[str, list[dict[str, int] | None]] = {site: [] for site in sites}
    for r in range(1, rounds + 1):
        path = round_dir(run_dir, r) / "aggregate.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        per_site = (record.get("traffic") or {}).get("per_site")
        if per_site is None:   # a round folder written before traffic was recorded
            per_site = {}
            for item in record.get("inputs", []):
                per_site.setdefault(item["site"], {"upload": 0, "download": 0})["upload"] = item["bytes"]
            for item in record.get("outputs", []):
                if item.get("kind") == "site":
                    per_site.setdefault(item["name"], {"upload": 0, "download": 0})["download"] = item["bytes"]
        for site in sites:
            traffic[site].append(per_site.get(site))
    return traffic


def evaluate_sites(plans, run_dir: Path, site_dirs: dict[str, Path], config: SimulationConfig, progress_factory) -> dict[str, dict]:
    from fedseg.training.evaluation import save_metrics

    final = round_dir(run_dir, config.rounds)
    results = {}
    for name, path in site_dirs.items():
        result = evaluate_site(
            plans, name, path, final / f"{name}.safetensors", run_dir / "state" / name,
            run_dir / "report" / "predictions" / name, device=config.device, mirror=config.mirror,
            progress_factory=progress_factory, max_voxels=config.max_voxels,
        )
        if result is not None:
            save_metrics(result, run_dir / "report" / f"metrics_{name}.json")
            results[name] = result
    return results


def check_site_image_sizes(dataset, max_voxels: int) -> None:
    """Refuse (InputError naming the file) a site whose training or test images declare more
    than `max_voxels` voxels; reads headers only."""
    from fedseg.data.case_loading import check_case_sizes

    check_case_sizes(dataset.cases("Tr") + dataset.cases("Ts"), max_voxels)


def evaluate_site(
    plans, site: str, dataset_root: Path, weights_path: Path, state_dir: Path, predictions_dir: Path,
    device: str = "cpu", mirror: bool = False, progress_factory=None, max_voxels: int = DEFAULT_MAX_VOXELS,
) -> dict | None:
    """Predict a site's test split (imagesTs) with the model it would use and score it against
    labelsTs; None when the site has no test split."""
    from fedseg.federation.site_training import load_site_model
    from fedseg.training.evaluation import evaluate_folders
    from fedseg.training.inference import predict_folder

    images, labels = Path(dataset_root) / "imagesTs", Path(dataset_root) / "labelsTs"
    if not images.is_dir() or not labels.is_dir():
        return None
    network = load_site_model(plans, site, weights_path, state_dir)
    n = len(list(labels.iterdir()))
    with (progress_factory or _no_progress)(f"predict {site}", n) as advance:
        predict_folder(network, images, predictions_dir, plans, plans.configuration_for(site), device=device,
                       mirror=mirror, progress=advance, site=site, max_voxels=max_voxels)
    return evaluate_folders(predictions_dir, labels, plans.labels, plans.file_ending, max_voxels=max_voxels)


def write_report(run_dir: Path, plan_id: str, val_dice, test_metrics, labels, traffic=None) -> Path:
    from fedseg.atomic import write_json_atomic

    report = run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    summary = {
        "plan_id": plan_id,
        "val_dice_per_round": val_dice,
        "test": {site: {"mean": r.get("mean"), "foreground_mean": r.get("foreground_mean")} for site, r in test_metrics.items()},
    }
    if traffic is not None:
        summary["bytes_per_round"] = traffic   # site -> per round {"upload": bytes, "download": bytes}
    write_json_atomic(report / "metrics.json", summary)
    plot_val_dice(val_dice, report / "val_dice.png")
    return report


def plot_val_dice(val_dice: dict[str, list[float | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from fedseg.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for site, values in sorted(val_dice.items()):
        rounds = [i + 1 for i, v in enumerate(values) if v is not None]
        ax.plot(rounds, [v for v in values if v is not None], marker="o", label=site)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # rounds are whole numbers
    ax.set_ylabel("local validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def result_to_dict(result: SimulationResult) -> dict:
    return asdict(result)


def _no_progress(description: str, total: int | None):
    import contextlib

    return contextlib.nullcontext(lambda *args, **kwargs: None)

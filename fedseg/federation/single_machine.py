"""A whole federation on one machine, through the same library calls as the shell pipeline.

`simulate` runs fingerprint -> plan -> init -> rounds of train/aggregate -> predict -> evaluate
in one run folder (fedseg.federation.run_folder). Started again on the same folder it resumes:
complete rounds linked to the round before them are kept, everything from the first other
round is redone.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedseg.data.dataset import load_dataset
from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.privacy import check_budget_before_round
from fedseg.federation.run_folder import discard_rounds_from, discover_sites, first_round_to_redo, round_dir
from fedseg.federation.run_setup import agreement_key, as_stored, check_overrides, init_run, plan_run
from fedseg.federation.run_summary import collect_traffic, collect_val_dice, write_report
from fedseg.federation.server_eval import SERVER_TEST_DIR, evaluate_server_models, is_server_test_set
from fedseg.federation.site_evaluation import check_site_image_sizes, evaluate_sites, no_progress
from fedseg.federation.site_training import run_site_round
from fedseg.training.site_state import snapshot_site_state
from fedseg.names import path_inside
from fedseg.planning.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint
from fedseg.planning.plans import Plans
from fedseg.training.folds import fold_name


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
    precision: str = "auto"                # the network's arithmetic: auto, fp32 or bf16 (fedseg.training.device)
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


def simulate(
    config: SimulationConfig,
    log: Callable[[str], None] = lambda message: None,
    progress_factory: Callable | None = None,
) -> SimulationResult:
    """Run fingerprint -> plan -> init -> rounds of train/aggregate -> predict -> evaluate."""
    run_dir = Path(config.run_dir)
    site_dirs = {p.name: p for p in discover_sites(Path(config.sites_root), log)}
    check_overrides(config.strategy, config.overrides)   # a bad strategy or --set fails before any work
    for path in site_dirs.values():  # so does an oversized image, at any site (headers only)
        check_site_image_sizes(load_dataset(path), config.max_voxels)
    progress_factory = progress_factory or no_progress

    # 1. fingerprints, one per site (reused when present); written only once the plan made
    # from them is valid, so a refused --set leaves the run folder as it was
    fingerprints, fresh = _fingerprints(config, site_dirs, progress_factory)
    # 2. plan, 3. init
    plans = plan_run(
        fingerprints, strategy=config.strategy, rounds=config.rounds, configuration=config.configuration,
        iterations=config.iterations, overrides=config.overrides, seed=config.seed, budget=config.budget,
    )
    for fp_path, fp in fresh.items():
        save_fingerprint(fp, fp_path)
    plans = init_run(run_dir, plans, log=log)
    # 4. rounds, from the first one that is not complete and linked to the one before
    val_dice = _rounds(config, plans, site_dirs, log, progress_factory)
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


def _fingerprints(
    config: SimulationConfig, site_dirs: dict[str, Path], progress_factory: Callable
) -> tuple[list[dict], dict[Path, dict]]:
    """Every site's fingerprint (read from the run folder when there) and the fresh ones by the
    path they are to be saved at."""
    fingerprints = []
    fresh: dict[Path, dict] = {}
    for name, path in site_dirs.items():
        fp_path = path_inside(Path(config.run_dir) / "fingerprints", f"{name}.json")
        if fp_path.is_file():
            fingerprints.append(load_fingerprint(fp_path))
            continue
        dataset = load_dataset(path)
        with progress_factory(f"fingerprint {name}", len(dataset.cases("Tr"))) as advance:
            fp = compute_fingerprint(dataset, name, workers=config.fingerprint_workers, progress=advance,
                                     max_voxels=config.max_voxels)
        fresh[fp_path] = as_stored(fp)
        fingerprints.append(fresh[fp_path])
    return fingerprints, fresh


def _rounds(
    config: SimulationConfig, plans: Plans, site_dirs: dict[str, Path], log: Callable[[str], None],
    progress_factory: Callable,
) -> dict[str, list[float | None]]:
    """Train and aggregate every round not yet complete; the sites' validation Dice per round."""
    run_dir = Path(config.run_dir)
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
        updates = [_train_site(config, plans, r, name, path, log, progress_factory) for name, path in site_dirs.items()]
        aggregate_round(plans, updates, rdir)
        collect_val_dice(rdir, val_dice)
    return val_dice


def _train_site(
    config: SimulationConfig, plans: Plans, r: int, name: str, path: Path, log: Callable[[str], None],
    progress_factory: Callable,
) -> Path:
    """One site's round r, from round r-1's model file; the path of its update."""
    run_dir = Path(config.run_dir)
    update = path_inside(round_dir(run_dir, r) / "updates", f"{name}.safetensors")
    snapshot_site_state(path_inside(run_dir / "state", name), r)
    with progress_factory(f"round {r}/{config.rounds} train {name}", config.iterations or plans.training.iterations_per_round) as advance:
        result = run_site_round(
            plans, name, path, round_dir(run_dir, r - 1) / f"{name}.safetensors", run_dir / "state" / name,
            update, iterations=config.iterations, device=config.device, num_workers=config.workers,
            progress=advance, agreement_key=agreement_key(run_dir, plans, name),
            max_voxels=config.max_voxels, fold=config.fold, precision=config.precision,
        )
    log(f"round {r} {name}: val Dice {result.val_dice:.3f} ({result.seconds:.1f}s)")
    return update


def simulate_folds(
    config: SimulationConfig,
    folds: list[int | str],
    log: Callable[[str], None] = lambda message: None,
    progress_factory: Callable | None = None,
) -> dict[str, SimulationResult]:
    """One federation per cross-validation fold, each in `run_dir/fold_<k>/` (nnU-Net's fold
    folders), all under the same plan. The sites' fingerprints are computed once and copied
    into the later folds' run folders. Returns fold folder name -> result."""
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


def result_to_dict(result: SimulationResult) -> dict:
    return asdict(result)

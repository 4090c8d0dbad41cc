"""A whole federation on one machine, through the same library calls as the shell pipeline.

Run folder (ARCHITECTURE.md §6): plans.json, fingerprints/, round_000/, round_r/updates/,
round_r/<site>.safetensors, round_r/models/, round_r/aggregate.json, state/<site>/, report/.
A round whose aggregate.json exists is complete and is not redone, so a killed simulation
started again continues from the last complete round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedseg.errors import InputError
from fedseg.federation.server_eval import SERVER_TEST_DIR, evaluate_server_models, is_server_test_set

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
    device: str = "cpu"
    mirror: bool = False
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


def discover_sites(sites_root: Path) -> list[Path]:
    if not sites_root.is_dir():
        raise InputError("sites folder not found", sites_root)
    # Folders whose name starts with "_" are not sites (e.g. `_server_test`, the server's test set).
    sites = sorted(p for p in sites_root.iterdir() if (p / "dataset.json").is_file() and not p.name.startswith("_"))
    if not sites:
        raise InputError("no site folders (sub-folders with a dataset.json) inside", sites_root)
    return sites


def simulate(
    config: SimulationConfig,
    log: Callable[[str], None] = lambda message: None,
    progress_factory: Callable | None = None,
) -> SimulationResult:
    """Run fingerprint -> plan -> init -> rounds of train/aggregate -> predict -> evaluate."""
    from fedseg.data.dataset import load_dataset
    from fedseg.federation.engine import aggregate_round
    from fedseg.federation.site_training import run_site_round
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint

    run_dir = Path(config.run_dir)
    site_dirs = {p.name: p for p in discover_sites(Path(config.sites_root))}
    get_strategy(config.strategy)   # an unknown strategy fails before any work
    progress_factory = progress_factory or _no_progress

    # 1. fingerprints, one per site (reused when present)
    fingerprints = []
    for name, path in site_dirs.items():
        fp_path = run_dir / "fingerprints" / f"{name}.json"
        if not fp_path.is_file():
            dataset = load_dataset(path)
            with progress_factory(f"fingerprint {name}", len(dataset.cases("Tr"))) as advance:
                save_fingerprint(compute_fingerprint(dataset, name, workers=config.fingerprint_workers, progress=advance), fp_path)
        fingerprints.append(load_fingerprint(fp_path))

    # 2. plan, 3. init
    plans = plan_and_init(
        run_dir, fingerprints, strategy=config.strategy, rounds=config.rounds, configuration=config.configuration,
        iterations=config.iterations, overrides=config.overrides, seed=config.seed, log=log,
    )

    # 4. rounds
    val_dice: dict[str, list[float | None]] = {name: [] for name in site_dirs}
    for r in range(1, config.rounds + 1):
        rdir = round_dir(run_dir, r)
        if (rdir / "aggregate.json").is_file():
            _collect_val_dice(rdir, val_dice)
            log(f"round {r}: already complete, skipped")
            continue
        updates = []
        for name, path in site_dirs.items():
            update = rdir / "updates" / f"{name}.safetensors"
            with progress_factory(f"round {r}/{config.rounds} train {name}", config.iterations or plans.training.iterations_per_round) as advance:
                result = run_site_round(
                    plans, name, path, round_dir(run_dir, r - 1) / f"{name}.safetensors", run_dir / "state" / name,
                    update, iterations=config.iterations, device=config.device, num_workers=config.workers,
                    progress=advance, fold=config.fold,
                )
            log(f"round {r} {name}: val Dice {result.val_dice:.3f} ({result.seconds:.1f}s)")
            updates.append(update)
        aggregate_round(plans, updates, rdir)
        _collect_val_dice(rdir, val_dice)

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
) -> Plans:
    """Plan from the sites' fingerprints into run_dir/plans.json and write round_000.

    Run again on the same folder (resume), the plan must come out the same; `keys` (site ->
    public key) make the plan require signed files, `signing_key` signs round_000.
    """
    from fedseg.atomic import write_text_atomic
    from fedseg.federation.engine import initial_round
    from fedseg.federation.manifest import attach_manifests
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.plans import load_plans
    from fedseg.planning.planner import make_plans

    plans_path = Path(run_dir) / "plans.json"
    overrides = {"training.rounds": str(rounds), **overrides}
    if iterations is not None:
        overrides["training.iterations_per_round"] = str(iterations)
    plans = make_plans(fingerprints, strategy=strategy, configuration=configuration, overrides=overrides, seed=seed)
    if keys:
        from fedseg.federation.signing import check_plan_keys

        plans.keys = dict(keys)
        check_plan_keys(plans.keys, sorted(plans.sites))
    plans = attach_manifests(plans, get_strategy(strategy))
    if plans_path.is_file():
        existing = load_plans(plans_path)
        if existing.plan_id != plans.plan_id:
            raise InputError("holds a different plan; use a new run folder (or delete it) to start over", plans_path)
    else:
        plans.save(plans_path)
    log(f"plan {plans.plan_id[:12]}: {len(plans.sites)} sites, strategy {strategy}, {rounds} rounds")
    if not (round_dir(run_dir, 0) / "done").is_file():
        initial_round(plans, round_dir(run_dir, 0), seed=plans.seed, signing_key=signing_key)
        write_text_atomic(round_dir(run_dir, 0) / "done", "")
    return plans


def _collect_val_dice(rdir: Path, val_dice: dict[str, list[float | None]]) -> None:
    from fedseg.federation.weightfile import read_weight_file

    for name in val_dice:
        update = rdir / "updates" / f"{name}.safetensors"
        value = None
        if update.is_file():
            _, meta = read_weight_file(update, verify_hash=False)
            value = meta.extra.get("val_dice")
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
            progress_factory=progress_factory,
        )
        if result is not None:
            save_metrics(result, run_dir / "report" / f"metrics_{name}.json")
            results[name] = result
    return results


def evaluate_site(
    plans, site: str, dataset_root: Path, weights_path: Path, state_dir: Path, predictions_dir: Path,
    device: str = "cpu", mirror: bool = False, progress_factory=None,
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
                       mirror=mirror, progress=advance, site=site)
    return evaluate_folders(predictions_dir, labels, plans.labels, plans.file_ending)


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

    from fedseg.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for site, values in sorted(val_dice.items()):
        rounds = [i + 1 for i, v in enumerate(values) if v is not None]
        ax.plot(rounds, [v for v in values if v is not None], marker="o", label=site)
    ax.set_xlabel("round")
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

"""A whole federation on one machine, through the same library calls as the shell pipeline.

Run folder (ARCHITECTURE.md §6): plans.json, fingerprints/, round_000/, round_r/updates/,
round_r/<site>.safetensors, round_r/models/, round_r/aggregate.json, state/<site>/, report/.
A round whose aggregate.json exists is complete and is not redone, so a killed simulation
started again continues from the last complete round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedseg.errors import InputError
from fedseg.federation.server_eval import SERVER_TEST_DIR, evaluate_server_models, is_server_test_set


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
    from fedseg.atomic import write_text_atomic
    from fedseg.data.dataset import load_dataset
    from fedseg.federation.engine import aggregate_round, initial_round
    from fedseg.federation.manifest import attach_manifests
    from fedseg.federation.site_training import run_site_round
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint
    from fedseg.planning.plans import load_plans
    from fedseg.planning.planner import make_plans

    run_dir = Path(config.run_dir)
    site_dirs = {p.name: p for p in discover_sites(Path(config.sites_root))}
    strategy = get_strategy(config.strategy)
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

    # 2. plan
    plans_path = run_dir / "plans.json"
    overrides = {"training.rounds": str(config.rounds), **config.overrides}
    if config.iterations is not None:
        overrides["training.iterations_per_round"] = str(config.iterations)
    plans = make_plans(fingerprints, strategy=config.strategy, configuration=config.configuration,
                       overrides=overrides, seed=config.seed)
    plans = attach_manifests(plans, strategy)
    if plans_path.is_file():
        existing = load_plans(plans_path)
        if existing.plan_id != plans.plan_id:
            raise InputError("holds a different plan; use a new run folder (or delete it) to start over", plans_path)
    else:
        plans.save(plans_path)
    log(f"plan {plans.plan_id[:12]}: {len(plans.sites)} sites, strategy {config.strategy}, {config.rounds} rounds")

    # 3. init
    if not (round_dir(run_dir, 0) / "done").is_file():
        initial_round(plans, round_dir(run_dir, 0), seed=plans.seed)
        write_text_atomic(round_dir(run_dir, 0) / "done", "")

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
                    progress=advance,
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
    from fedseg.federation.site_training import load_site_model
    from fedseg.training.evaluation import evaluate_folders, save_metrics
    from fedseg.training.inference import predict_folder

    final = round_dir(run_dir, config.rounds)
    results = {}
    for name, path in site_dirs.items():
        images, labels = path / "imagesTs", path / "labelsTs"
        if not images.is_dir() or not labels.is_dir():
            continue
        network = load_site_model(plans, name, final / f"{name}.safetensors", run_dir / "state" / name)
        out = run_dir / "report" / "predictions" / name
        n = len(list(labels.iterdir()))
        with progress_factory(f"predict {name}", n) as advance:
            predict_folder(network, images, out, plans, plans.configuration_for(name), device=config.device,
                           mirror=config.mirror, progress=advance, site=name)
        result = evaluate_folders(out, labels, plans.labels, plans.file_ending)
        save_metrics(result, run_dir / "report" / f"metrics_{name}.json")
        results[name] = result
    return results


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

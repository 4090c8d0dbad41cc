"""`fedseg simulate`: the whole federation on one machine, with a report."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.options import (
    BUDGET, CONFIGURATION, DEVICE, ITERATIONS, JSON, MAX_VOXELS, PRECISION, QUIET, RESUME, ROUNDS, RUN_OUTPUT, SEED, SET,
    SITES_ROOT, STRATEGY, WORKERS, parse_set_options, require_dir, require_output_dir, split_list_option,
)


def simulate(
    sites_root: Path = SITES_ROOT,
    strategy: str = STRATEGY,
    rounds: int = ROUNDS,
    output: Path = RUN_OUTPUT,
    config: str = CONFIGURATION,
    iterations: int = ITERATIONS,
    set_: list[str] = SET,
    seed: int = SEED,
    workers: int = WORKERS,
    device: str = DEVICE,
    precision: str = PRECISION,
    budget: float = BUDGET,
    mirror: bool = typer.Option(False, "--mirror/--no-mirror", help="Mirroring at test time."),
    resume: bool = RESUME,
    max_voxels: int = MAX_VOXELS,
    folds: list[str] = typer.Option(
        None, "--folds",
        help="Cross-validation folds to run, one federation each in RUN/fold_<k>/ (e.g. --folds 0,1,2,3,4; 'all' trains on every case). Default: fold 0 in RUN itself.",
    ),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Run fingerprint, plan, init, rounds of train/aggregate, then predict and evaluate each site.

    Every intermediate file lands in the run folder. A run folder that already holds files
    is refused unless --resume is given; with --resume a killed run continues from its last
    complete round. Every option and --set is checked before the first file is written.
    Ends with the per-site test Dice table.

    Example: fedseg simulate sites --strategy fedavg --rounds 3 -o run --device auto --budget 8
    Five-fold cross-validation (model selection, see docs/model-selection.md):
    fedseg simulate sites --rounds 3 --folds 0,1,2,3,4 -o runs/3d_fullres
    """
    from fedseg.cli.console import Reporter
    from fedseg.federation.run_folder import check_run_folder
    from fedseg.federation.single_machine import SimulationConfig, result_to_dict, simulate_folds
    from fedseg.federation.single_machine import simulate as run_simulation
    from fedseg.training.device import check_precision, resolve_device
    from fedseg.training.folds import fold_name, parse_fold

    require_output_dir(output, "run folder")
    fold_list = [parse_fold(f) for f in split_list_option(folds)]
    # a cross-validation folder holds one run per fold; each must be a run to resume
    for run_dir in [output / fold_name(fold) for fold in fold_list] if fold_list and resume else [output]:
        check_run_folder(run_dir, resume)
    require_dir(sites_root, "sites folder")
    overrides = parse_set_options(set_)
    reporter = Reporter(quiet=quiet)
    cfg = SimulationConfig(
        sites_root=sites_root, strategy=strategy, rounds=rounds, run_dir=output, configuration=config,
        iterations=iterations, overrides=overrides, seed=seed, workers=workers, device=resolve_device(device),
        precision=check_precision(precision), mirror=mirror, budget=budget, max_voxels=max_voxels,
    )
    if fold_list:
        results = simulate_folds(cfg, fold_list, log=reporter.log, progress_factory=reporter.progress)
        _show(list(results.values()), {name: result_to_dict(r) for name, r in results.items()}, as_json, quiet)
        return
    result = run_simulation(cfg, log=reporter.log, progress_factory=reporter.progress)
    _show([result], result_to_dict(result), as_json, quiet)


def _show(results: list, summary: dict, as_json: bool, quiet: bool) -> None:
    """The JSON summary with --json, else each result's Dice table (nothing with --quiet)."""
    from fedseg.cli.console import print_json

    if as_json:
        print_json(summary)
    elif not quiet:
        for result in results:
            print_dice_table(result)


def print_dice_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    rounds = f"{result.rounds} round" + ("" if result.rounds == 1 else "s")
    table = Table(title=f"Test Dice per site ({rounds}) — {result.report_dir}")
    table.add_column("site")
    table.add_column("val Dice per round")
    labels: list[str] = []
    for metrics in result.test_metrics.values():
        labels = [name for name in (metrics.get("mean") or {}) if name != "background"]
        break
    for label in labels:
        table.add_column(f"Dice {label}", justify="right")
    table.add_column("mean Dice", justify="right")
    for site, metrics in sorted(result.test_metrics.items()):
        per_round = " ".join("-" if v is None else f"{v:.2f}" for v in result.val_dice.get(site, []))
        row = [site, per_round]
        for label in labels:
            row.append(_fmt(metrics["mean"][label].get("dice")))
        row.append(_fmt((metrics.get("foreground_mean") or {}).get("dice")))
        table.add_row(*row)
    Console().print(table)


def _fmt(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)

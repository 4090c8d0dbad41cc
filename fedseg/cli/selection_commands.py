"""Model selection: `fedseg validate` at each site, `fedseg find-best` at the coordinator."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.options import CHECKPOINT, DEVICE, JSON, PRECISION, QUIET, require_dir, require_file, split_list_option

# Kept equal to fedseg.federation.site_validation.DEFAULT_STATE_TEMPLATE (spelled out so
# --help does not import the library).
STATE_TEMPLATE = "{run}/fold_{fold}/state/{site}"


def validate(
    site: str = typer.Option(..., "--site", help="This site's name in the plans."),
    data: Path = typer.Option(..., "--data", help="The site's nnU-Net raw dataset folder."),
    run: list[Path] = typer.Option(..., "--run", help="A configuration's cross-validation folder (fold_<k>/ run folders inside); repeat per configuration."),
    fold: list[str] = typer.Option(..., "--fold", help="Fold(s) to score: --fold 0,1,2,3,4 (every fold: the whole cross-validation) or repeated --fold k."),
    output: Path = typer.Option(..., "-o", "--output", help="Validation file to write (numbers only; send it to the coordinator)."),
    checkpoint: str = CHECKPOINT,
    state_template: str = typer.Option(STATE_TEMPLATE, "--state-template", help="Where the site's state folder (splits_final.json, local parameters) of a run's fold is."),
    device: str = DEVICE,
    precision: str = PRECISION,
    mirror: bool = typer.Option(False, "--mirror/--no-mirror", help="Average predictions over mirrored inputs."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Score each configuration and each pair's ensemble on this site's validation cases.

    Fold k's validation cases (STATE/splits_final.json) are predicted with fold k's model of
    every run, with and without keep-largest-component post-processing. The file holds Dice
    sums and case counts only: no case name, voxel or prediction leaves the site.

    Example: fedseg validate --site site_a --data sites/site_a --run runs/3d_fullres --run runs/2d
    --fold 0,1,2,3,4 -o site_a.validation.json
    """
    from fedseg.atomic import write_json_atomic
    from fedseg.cli.console import Reporter, print_json
    from fedseg.federation.site_validation import validate_site
    from fedseg.training.device import check_precision
    from fedseg.training.folds import parse_fold

    check_precision(precision)
    reporter = Reporter(quiet=quiet)
    roots = [require_dir(r, "run folder") for r in run]
    with reporter.progress(f"validate {site}", None) as advance:
        record = validate_site(
            site, require_dir(data, "dataset folder"), roots, [parse_fold(f) for f in split_list_option(fold)], checkpoint=checkpoint,
            state_template=state_template, device=device, mirror=mirror, progress=advance,
            precision=precision,
        )
    write_json_atomic(output, record)
    reporter.log(f"wrote {output}: {len(record['candidates'])} candidate(s) over folds {', '.join(record['folds'])}")
    if as_json:
        print_json(record)


def find_best(
    runs: list[Path] = typer.Argument(..., help="The configurations' cross-validation folders (as given to fedseg validate)."),
    metrics: list[Path] = typer.Option(..., "-m", "--metrics", help="A site's validation file; repeat for every site."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for inference_plan.json."),
    no_ensembles: bool = typer.Option(False, "--no-ensembles", help="Consider single configurations only."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Pick the best configuration or ensemble (case-weighted mean Dice over all sites) and
    decide post-processing; write OUTPUT/inference_plan.json and print the predict command.

    Example: fedseg find-best runs/3d_fullres runs/2d -m site_a.validation.json
    -m site_b.validation.json -m site_c.validation.json -o selection
    """
    from fedseg.atomic import write_json_atomic
    from fedseg.cli.console import print_json
    from fedseg.federation.model_selection import find_best as choose, predict_command

    roots = [require_dir(r, "run folder") for r in runs]
    files = [require_file(m, "validation file") for m in metrics]
    plan_path = Path(output) / "inference_plan.json"
    plan = choose(roots, files, Path(output), allow_ensembles=not no_ensembles)
    plan["command"] = predict_command(plan_path)
    write_json_atomic(plan_path, plan)
    if as_json:
        print_json(plan)
    elif not quiet:
        _print_choice(plan, plan_path)


def _print_choice(plan: dict, plan_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Candidates ({len(plan['sites'])} sites, folds {', '.join(plan['folds'])})")
    table.add_column("candidate")
    table.add_column("cases", justify="right")
    table.add_column("mean Dice", justify="right")
    for name, row in sorted(plan["candidates"].items(), key=lambda kv: -(kv[1]["foreground_mean_dice"] or -1)):
        dice = row["foreground_mean_dice"]
        table.add_row(name + (" *" if name == plan["chosen"] else ""), str(row["n_cases"]), "-" if dice is None else f"{dice:.4f}")
    console = Console()
    console.print(table)
    pp = plan["postprocessing"]
    console.print(f"chosen: {plan['chosen']}; keep largest foreground component: {pp['largest_foreground']}; "
                  f"per label: {pp['largest_per_label'] or 'none'}")
    console.print(f"wrote {plan_path}\nrun: {plan['command']}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.command("find-best")(find_best)

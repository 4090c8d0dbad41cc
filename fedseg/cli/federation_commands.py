"""Coordinator commands: init (round-0 weights) and aggregate (one round)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.options import JSON, QUIET, require_file


def init(
    plans_path: Path = typer.Option(..., "--plans", help="plans.json from `fedseg plan`."),
    output: Path = typer.Option(..., "-o", "--output", help="Round folder to write (e.g. run/round_000)."),
    key: Path = typer.Option(None, "--key", help="The coordinator's private key; required when the plan lists keys."),
    from_nnunet: Path = typer.Option(None, "--from-nnunet", help="Start from this nnU-Net trained model's weights (plan made with --from-nnunet)."),
    fold: str = typer.Option("all", "--fold", help="With --from-nnunet: which fold's checkpoint_final.pth (a number or 'all')."),
    quiet: bool = QUIET,
) -> None:
    """Write round-0 weights for every site (same seed, same weights).

    With --from-nnunet the round starts from an nnU-Net checkpoint, read without running
    any code from it (tensors and plain values only).

    Example: fedseg init --plans plans.json -o run/round_000
    """
    from fedseg.cli.console import Reporter
    from fedseg.federation.engine import initial_round
    from fedseg.planning.plans import load_plans

    plans = load_plans(require_file(plans_path, "plans file"))
    start = None
    if from_nnunet is not None:
        from fedseg.cli.export_commands import nnunet_start_state

        start = nnunet_start_state(plans, from_nnunet, fold)
    written = initial_round(plans, output, seed=plans.seed, signing_key=_signing_key(key), start_state=start)
    Reporter(quiet=quiet).log(f"wrote {len(written)} files under {output}")


def aggregate(
    updates: list[Path] = typer.Argument(..., help="Update files of one round, one per site."),
    plans_path: Path = typer.Option(..., "--plans", help="plans.json the updates were trained under."),
    output: Path = typer.Option(..., "-o", "--output", help="Round folder to write (e.g. run/round_001)."),
    key: Path = typer.Option(None, "--key", help="The coordinator's private key; required when the plan lists keys."),
    previous: Path = typer.Option(None, "--previous", help="Round folder the sites started from (clip_norm only; default: round_<r-1> beside OUTPUT)."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Validate the round's updates and aggregate them with the plan's strategy.

    Writes OUTPUT/<site>.safetensors (what each site loads next), OUTPUT/models/<pool>.safetensors
    and OUTPUT/aggregate.json. One bad update: exit 2 naming it, nothing written. Robust rules
    (plan --set robust=median | robust=trimmed:0.2 | clip_norm=X) apply here; re-running
    with the same updates writes the same files.

    Example: fedseg aggregate --plans plans.json run/round_001/updates/*.safetensors -o run/round_001
    """
    from dataclasses import asdict

    from fedseg.cli.console import Reporter, print_json
    from fedseg.federation.engine import aggregate_round
    from fedseg.planning.plans import load_plans

    reporter = Reporter(quiet=quiet)
    plans = load_plans(require_file(plans_path, "plans file"))
    report = aggregate_round(
        plans, [require_file(p, "update file") for p in updates], output, log=reporter.log,
        signing_key=_signing_key(key), previous_dir=previous,
    )
    reporter.log(f"aggregated round {report.round} from {len(updates)} updates into {output}")
    if as_json:
        print_json(asdict(report))


def _signing_key(path: Path | None):
    if path is None:
        return None
    from fedseg.federation.signing import load_signing_key

    return load_signing_key(require_file(path, "private key"))


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("aggregate")(aggregate)

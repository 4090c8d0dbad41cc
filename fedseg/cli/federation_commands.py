"""Coordinator commands: init (round-0 weights) and aggregate (one round)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.options import JSON, QUIET, require_dir, require_file, require_output_dir

REPLACE = typer.Option(
    False, "--replace", help="Replace a complete round folder made from other inputs, as a whole (default: refuse).",
)


def init(
    plans_path: Path = typer.Option(..., "--plans", help="plans.json from `fedseg plan`."),
    output: Path = typer.Option(..., "-o", "--output", help="Round folder to write (e.g. run/round_000)."),
    key: Path = typer.Option(None, "--key", help="The coordinator's private key; required when the plan lists keys."),
    replace: bool = REPLACE,
    from_nnunet: Path = typer.Option(None, "--from-nnunet", help="Start from this nnU-Net trained model's weights (plan made with --from-nnunet)."),
    fold: str = typer.Option("all", "--fold", help="With --from-nnunet: which fold's checkpoint_final.pth (a number or 'all')."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Write round-0 weights for every site (same seed, same weights).

    The files appear together with OUTPUT/init.json, the record listing each with its
    sha256. Run again with the same plan: nothing changes; with another plan: refused
    unless --replace.
    With --from-nnunet the round starts from an nnU-Net checkpoint, read without running
    any code from it (tensors and plain values only).

    Example: fedseg init --plans plans.json -o run/round_000
    """
    from fedseg.cli.console import Reporter
    from fedseg.federation.round_zero import initial_round
    from fedseg.planning.plans import load_plans

    require_output_dir(output, "round folder")
    plans = load_plans(require_file(plans_path, "plans file"))
    start = None
    if from_nnunet is not None:
        from fedseg.cli.export_commands import nnunet_start_state

        start = nnunet_start_state(plans, from_nnunet, fold)
    written = initial_round(plans, output, seed=plans.seed, signing_key=_signing_key(key), start_state=start, replace=replace)
    Reporter(quiet=quiet).log(f"wrote {len(written)} files under {output}")
    if as_json:
        from fedseg.cli.console import print_json

        print_json({"output": str(output), "plan_id": plans.plan_id, "written": [str(p) for p in written]})


def aggregate(
    updates: list[Path] = typer.Argument(..., help="Update files of one round, one per site."),
    plans_path: Path = typer.Option(..., "--plans", help="plans.json the updates were trained under."),
    output: Path = typer.Option(..., "-o", "--output", help="Round folder to write (e.g. run/round_001)."),
    key: Path = typer.Option(None, "--key", help="The coordinator's private key; required when the plan lists keys."),
    previous: Path = typer.Option(None, "--previous", help="Round folder the sites started from (clip_norm and DP accounting; default: round_<r-1> beside OUTPUT)."),
    replace: bool = REPLACE,
    recovery: list[Path] = typer.Option(None, "--recovery", help="Secure aggregation: a surviving site's seed file for sites that dropped out (fedseg reveal-seeds); repeat per survivor."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Validate the round's updates and aggregate them with the plan's strategy.

    Writes OUTPUT/<site>.safetensors (what each site loads next), OUTPUT/models/<pool>.safetensors
    and OUTPUT/aggregate.json, the commit record listing every output with its sha256: the
    files appear together or not at all. One bad update: exit 2 naming it, nothing written.
    OUTPUT must be the updates' round (round_NNN), never an updates/ folder. Robust rules
    (plan --set robust=median | robust=trimmed:0.2 | clip_norm=X) apply here. Re-running
    with the same updates changes nothing; other updates for a complete round are refused
    unless --replace. Two aggregations of one round never interleave (the second: exit 2).
    With differential privacy (plan --set dp.*) aggregate.json states ε at δ so far, and a
    round that would exceed dp.max_epsilon is refused (exit 2). With secure aggregation, a
    site that dropped out needs a --recovery file from every surviving site (docs/privacy.md).

    Example: fedseg aggregate --plans plans.json run/round_001/updates/*.safetensors -o run/round_001
    """
    from dataclasses import asdict

    from fedseg.cli.console import Reporter, print_json
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.planning.plans import load_plans

    require_output_dir(output, "round folder")
    if previous is not None:
        require_dir(previous, "previous round folder")
    reporter = Reporter(quiet=quiet)
    plans = load_plans(require_file(plans_path, "plans file"))
    report = aggregate_round(
        plans, [require_file(p, "update file") for p in updates], output, log=reporter.log,
        signing_key=_signing_key(key), previous_dir=previous, replace=replace,
        recovery=[require_file(p, "recovery file") for p in recovery or []],
    )
    reporter.log(f"aggregated round {report.round} from {len(updates)} updates into {output}")
    if as_json:
        print_json(asdict(report))


def reveal_seeds(
    site: str = typer.Option(..., "--site", help="This (surviving) site's name in the plan."),
    plans_path: Path = typer.Option(..., "--plans", help="plans.json of the federation."),
    key: Path = typer.Option(..., "--key", help="This site's private key (fedseg keygen)."),
    round_index: int = typer.Option(..., "--round", min=1, help="The round the other sites dropped out of."),
    dropped: list[str] = typer.Option(..., "--dropped", help="A site that sent no update this round; repeat for several."),
    output: Path = typer.Option(..., "-o", "--output", help="Recovery file to write (send it to the coordinator)."),
    quiet: bool = QUIET,
) -> None:
    """Secure aggregation: reveal this site's mask seeds with sites that dropped out of a round.

    The coordinator can then remove the dropped sites' masks from the sum. Only the seeds of
    this round, with the named sites, are revealed: this site's update stays hidden behind its
    masks with the other survivors. Reveal only for sites the coordinator never got an
    update from (docs/security.md).

    Example: fedseg reveal-seeds --site site_a --plans plans.json --key keys/site_a.key --round 3
    --dropped site_c -o run/round_003/recovery/site_a.json
    """
    from fedseg.cli.console import Reporter
    from fedseg.federation.privacy import reveal_seeds as write_seeds
    from fedseg.federation.secure_aggregation import load_agreement_key
    from fedseg.planning.plans import load_plans

    plans = load_plans(require_file(plans_path, "plans file"))
    plans.site(site)
    agreement = load_agreement_key(require_file(key, "private key"))
    if agreement.site != site:
        from fedseg.errors import InputError

        raise InputError(f"is the key of {agreement.site!r}, not of site {site!r}", key)
    path = write_seeds(plans, agreement, round_index, dropped, output)
    Reporter(quiet=quiet).log(f"wrote {path}: {site}'s round-{round_index} seeds with {', '.join(sorted(set(dropped)))}")


def _signing_key(path: Path | None):
    if path is None:
        return None
    from fedseg.federation.signing import load_signing_key

    return load_signing_key(require_file(path, "private key"))


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("aggregate")(aggregate)
    app.command("reveal-seeds")(reveal_seeds)

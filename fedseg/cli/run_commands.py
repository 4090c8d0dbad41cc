"""Commands that read a run folder: status (where a federation stands) and report (an HTML page)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.options import JSON, QUIET, require_dir


def status(
    run_dir: Path = typer.Argument(..., help="A run folder (simulate, flower serve, or shell scripts)."),
    as_json: bool = JSON,
) -> None:
    """Where a federation stands: rounds done, sites in and missing, Dice, norms, what comes next.

    Reads the run folder alone (plans.json, round_r/aggregate.json, round_r/updates/).

    Example: fedseg status run --json
    """
    from fedseg.cli.console import print_json
    from fedseg.federation.run_status import run_status

    state = run_status(require_dir(run_dir, "run folder"))
    if as_json:
        print_json(state.to_dict())
        return
    print(format_status(state))


def format_status(state) -> str:
    """The status as a few plain lines for a terminal or a log."""
    signing = "signed files required" if state.signing_required else "unsigned"
    lines = [
        f"run {state.run_dir}: plan {state.plan_id[:12]}, strategy {state.strategy}, {signing}",
        f"sites: {', '.join(state.sites)} (quorum {state.min_sites} of {len(state.sites)})",
        f"rounds: {state.rounds_completed} of {state.rounds_planned} complete"
        + ("" if state.wall_s is None else f", {state.wall_s:.0f} s wall time"),
    ]
    for r in state.rounds:
        if r.complete:
            dice = "–" if r.mean_val_dice is None else f"{r.mean_val_dice:.3f}"
            per_site = ", ".join(
                f"{s.site} {'–' if s.val_dice is None else f'{s.val_dice:.3f}'}"
                f" (norm {'–' if s.update_norm is None else f'{s.update_norm:.3g}'})"
                for s in r.sites
            )
            missing = f"; missing {', '.join(_with_reasons(r.sites_missing, r.failures))}" if r.sites_missing else ""
            took = "" if r.wall_s is None else f" ({r.wall_s:.0f} s)"
            lines.append(f"  round {r.round}{took}: mean val Dice {dice}: {per_site}{missing}{_privacy_note(r.privacy)}")
        else:
            lines.append(
                f"  round {r.round}: under way, updates in from {', '.join(r.sites_in) or 'no site'}"
                f"; waiting for {', '.join(_with_reasons(r.sites_missing, r.failures)) or 'nobody'}"
            )
    for site, metrics in sorted(state.test_metrics.items()):
        dice = ((metrics or {}).get("foreground_mean") or {}).get("dice")
        if dice is not None:
            lines.append(f"  test {site}: foreground Dice {dice:.3f}")
    lines.append(f"next: {state.next_action}")
    return "\n".join(lines)


def _privacy_note(privacy: dict | None) -> str:
    """'; masked; ε 1.2 at δ 1e-05' for a round under secure aggregation and DP."""
    if not privacy:
        return ""
    parts = ["masked"] if privacy["secure_aggregation"] else []
    if privacy["epsilon"] is not None:
        parts.append(f"ε {privacy['epsilon']:.3g} at δ {privacy['delta']:g}")
    return "; " + "; ".join(parts) if parts else ""


def _with_reasons(sites: list[str], failures: dict[str, str]) -> list[str]:
    """Site names, each with why it is missing when the run recorded it (Flower: site_failures.json)."""
    return [f"{site} ({failures[site]})" if site in failures else site for site in sites]


def report(
    run_dir: Path = typer.Argument(..., help="A run folder (simulate, flower serve, or shell scripts)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write report.html into."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Write one self-contained HTML page about a run (plots embedded; opens without its folder).

    Per-site validation Dice, training loss and learning rate per round, update norms, bytes
    exchanged, missing sites, and test metrics when the run has them.

    Example: fedseg report run -o run/report
    """
    from fedseg.cli.console import Reporter, print_json
    from fedseg.federation.run_report import write_run_report

    path = write_run_report(require_dir(run_dir, "run folder"), output)
    Reporter(quiet=quiet).log(f"wrote {path}")
    if as_json:
        print_json({"output": str(path)})


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("report")(report)

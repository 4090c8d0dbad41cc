"""`fedseg report`: one self-contained HTML page about a run folder.

Everything comes from `run_status` (so it works for folders written by `simulate`, by
`flower serve` or by shell scripts); the plots are PNGs embedded as base64 data URIs, so the
page opens anywhere without its folder: per-site validation Dice, training loss and
learning rate (the curves sites send in their update's `extra["curve"]`), update norms,
bytes exchanged, missing sites and the test metrics when report/metrics.json holds them.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseg.atomic import write_text_atomic
from fedseg.federation.plotting import MaxNLocator, plt
from fedseg.federation.run_status import RunStatus, run_status

REPORT_FILE = "report.html"


def write_run_report(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write OUT_DIR/report.html for the run in `run_dir`; returns its path."""
    status = run_status(run_dir)
    path = Path(out_dir) / REPORT_FILE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_html(status))
    path.chmod(0o644)   # a page to share (atomic writes start private)
    return path


# -- series -------------------------------------------------------------------------------
def _per_site(status: RunStatus, value: Callable[[Any], float | None]) -> dict[str, tuple[list[int], list[float]]]:
    """site -> (rounds, values) over complete rounds, skipping rounds without a value."""
    series: dict[str, tuple[list[int], list[float]]] = {site: ([], []) for site in status.sites}
    for r in status.rounds:
        for entry in r.sites:
            v = value(entry)
            if v is not None and entry.site in series:
                series[entry.site][0].append(r.round)
                series[entry.site][1].append(v)
    return {site: s for site, s in series.items() if s[0]}


def _curves(status: RunStatus, key: str) -> dict[str, tuple[list[float], list[float]]]:
    """site -> (position in rounds, value): each round's curve placed on (round - 1, round]."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in status.rounds:
        for entry in r.sites:
            iterations, values = entry.curve.get("iteration") or [], entry.curve.get(key) or []
            if not iterations or len(iterations) != len(values):
                continue
            last = max(iterations) or 1
            xs, ys = series.setdefault(entry.site, ([], []))
            for it, v in zip(iterations, values):
                if v is not None:
                    xs.append(r.round - 1 + it / last)
                    ys.append(float(v))
    return series


# -- plots --------------------------------------------------------------------------------
def _figure_png(draw: Callable[[Any], None], ylabel: str, log_y: bool = False, integer_rounds: bool = True) -> str:
    """A small matplotlib figure as a base64 PNG data URI."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    draw(ax)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if integer_rounds:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # rounds are whole numbers
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _lines(series: dict[str, tuple[list, list]], marker: str | None = "o") -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        for site, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker=marker, markersize=3, label=site)

    return draw


def _bytes_bars(status: RunStatus) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        rounds = [r for r in status.rounds if r.complete]
        up = [sum(s.upload_bytes or 0 for s in r.sites) / 1e6 for r in rounds]
        down = [sum(s.download_bytes or 0 for s in r.sites) / 1e6 for r in rounds]
        xs = [r.round for r in rounds]
        ax.bar(xs, up, label="upload (updates)")
        ax.bar(xs, down, bottom=up, label="download (models)")

    return draw


# -- page ---------------------------------------------------------------------------------
def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plot_section(title: str, uri: str | None, empty: str) -> str:
    inner = f'<img alt="{html.escape(title)}" src="{uri}">' if uri else f"<p class=note>{html.escape(empty)}</p>"
    return f"<section><h2>{html.escape(title)}</h2>{inner}</section>"


def render_html(status: RunStatus) -> str:
    """The report page for `status` (no external resources)."""
    complete = [r for r in status.rounds if r.complete]
    dice = _per_site(status, lambda s: s.val_dice)
    norms = _per_site(status, lambda s: s.update_norm)
    loss, lr = _curves(status, "loss"), _curves(status, "lr")
    sections = [
        _plot_section("Validation Dice per site", _figure_png(_lines(dice), "local validation Dice") if dice else None,
                      "No site reported a validation Dice."),
        _plot_section("Training loss", _figure_png(_lines(loss, None), "training loss") if loss else None,
                      "No site reported a training curve (updates written before curves were sent)."),
        _plot_section("Learning rate", _figure_png(_lines(lr, None), "learning rate", log_y=True) if lr else None,
                      "No site reported a learning-rate curve."),
        _plot_section("Update norms", _figure_png(_lines(norms), "L2 norm of the update") if norms else None,
                      "No complete round yet."),
        _plot_section("Bytes exchanged", _figure_png(_bytes_bars(status), "MB per round") if complete else None,
                      "No complete round yet."),
    ]
    round_rows = [
        [r.round, "complete" if r.complete else "under way", ", ".join(r.sites_in) or "–",
         ", ".join(f"{s} ({r.failures[s]})" if s in r.failures else s for s in r.sites_missing) or "–",
         r.mean_val_dice, r.bytes, r.wall_s,
         {True: "yes", False: "no", None: "–"}[r.signed]]
        for r in status.rounds
    ]
    rounds_table = _table(
        ["round", "state", "sites in", "missing sites", "mean val Dice", "bytes", "wall s", "signed"], round_rows)
    test = ""
    if status.test_metrics:
        rows = []
        for site, metrics in sorted(status.test_metrics.items()):
            mean = (metrics or {}).get("foreground_mean") or {}
            rows.append([site, *(mean.get(k) for k in ("dice", "iou", "hd95"))])
        test = f"<section><h2>Test metrics (foreground mean)</h2>{_table(['site', 'Dice', 'IoU', 'HD95'], rows)}</section>"
    summary = _table(["plan", "strategy", "sites", "quorum", "rounds", "signed files", "wall time"], [[
        status.plan_id[:12], status.strategy, ", ".join(status.sites), f"{status.min_sites} of {len(status.sites)}",
        f"{status.rounds_completed} of {status.rounds_planned}", "required" if status.signing_required else "no",
        "–" if status.wall_s is None else f"{status.wall_s:.0f} s",
    ]])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedseg report {html.escape(status.plan_id[:12])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
th {{ background: #f0f0f0; }}
.note {{ color: #777; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>fedseg run report</h1>
<p id="next-action">Next: {html.escape(status.next_action)}</p>
{summary}
<section><h2>Rounds</h2>{rounds_table}</section>
{test}
{''.join(sections)}
</body></html>
"""

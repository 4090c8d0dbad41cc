"""A run's summary in report/: metrics.json (validation Dice per round, test means, traffic)
and val_dice.png, gathered from the round folders' records and update metadata."""

from __future__ import annotations

import json
from pathlib import Path

from fedseg.atomic import atomic_path, write_json_atomic
from fedseg.federation.plotting import MaxNLocator, plt
from fedseg.federation.run_folder import round_dir
from fedseg.federation.weightfile import open_weight_file


def collect_val_dice(rdir: Path, val_dice: dict[str, list[float | None]]) -> None:
    """Append each site's validation Dice of round `rdir` (from its update's metadata; None when absent)."""
    for name in val_dice:
        update = rdir / "updates" / f"{name}.safetensors"
        value = None
        if update.is_file():
            with open_weight_file(update) as reader:   # metadata only
                value = reader.meta.extra.get("val_dice")
        val_dice[name].append(value)


def collect_traffic(run_dir: Path, rounds: int, sites: list[str]) -> dict[str, list[dict[str, int] | None]]:
    """Bytes each site sent (its update) and received (its next model file) per round, from aggregate.json."""
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


def write_report(run_dir: Path, plan_id: str, val_dice, test_metrics, labels, traffic=None) -> Path:
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

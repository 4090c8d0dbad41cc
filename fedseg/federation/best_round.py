"""The best round: which round's models scored highest on the sites' validation cases.

Each update of round r reports the validation Dice its site measured for the model it
started from (round r-1's file) and how many validation cases that rests on. The
coordinator records them in round r's aggregate.json (`validation`) and keeps a copy of
the best-scoring round's model files in `best/` beside the round folders (nnU-Net's
`checkpoint_best.pth` beside `checkpoint_final.pth`). The score is the case-weighted mean
Dice (Σ n_s·d_s / Σ n_s): every validation case weighs the same, whichever site holds it.

The last round's models are started from by no update, so they are scored by
`fedseg validate` rather than here.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedseg.atomic import write_json_atomic
from fedseg.errors import InputError

BEST_DIR = "best"
BEST_RECORD = "best.json"


def validation_summary(
    round_index: int, site_extras: Mapping[str, Mapping[str, Any]], paths: Sequence[Path] = ()
) -> dict[str, Any] | None:
    """What round `round_index`'s updates say about round `round_index - 1`'s models.

    `site_extras`: site -> the update's metadata extra (`paths`: the update files, in the
    same order, for error messages). Updates trained on different folds belong to different
    federations: an InputError. None when no update reported a score.
    """
    per_site: dict[str, dict[str, float | int]] = {}
    folds: dict[str, str] = {}
    for index, (site, extra) in enumerate(site_extras.items()):
        dice, n_cases = extra.get("incoming_val_dice"), extra.get("n_val_cases")
        if isinstance(dice, (int, float)) and math.isfinite(dice) and isinstance(n_cases, int) and n_cases > 0:
            per_site[site] = {"dice": float(dice), "n_cases": n_cases}
        if "fold" in extra:
            folds.setdefault(str(extra["fold"]), str(paths[index]) if index < len(paths) else site)
    if len(folds) > 1:
        raise InputError(
            "updates of different cross-validation folds cannot be aggregated together: "
            + ", ".join(f"fold {f} ({where})" for f, where in sorted(folds.items()))
        )
    if not per_site:
        return None
    per_site = dict(sorted(per_site.items()))
    total = sum(v["n_cases"] for v in per_site.values())
    return {
        "scored_round": round_index - 1,
        "per_site": per_site,
        "n_cases": total,
        "mean_dice": sum(v["dice"] * v["n_cases"] for v in per_site.values()) / total,
        "fold": next(iter(folds), None),
    }


def update_best(run_dir: Path, summary: Mapping[str, Any] | None, log=None) -> bool:
    """Copy the scored round's model files to `run_dir/best/` when it beats the recorded best.

    Only a round folder beside the aggregated one is copied (`round_<scored>`); a score
    without that folder (an aggregate run outside a run folder) changes nothing. The swap is
    done by renames, so `best/` is always one complete round. Returns True when replaced.
    """
    if summary is None:
        return False
    run_dir = Path(run_dir)
    source = run_dir / f"round_{summary['scored_round']:03d}"
    if not source.is_dir():
        return False
    best = run_dir / BEST_DIR
    current = read_best(run_dir)
    if current is not None and current["mean_dice"] >= summary["mean_dice"]:
        return False
    staging = Path(tempfile.mkdtemp(prefix=".best.", dir=run_dir))
    for path in _model_files(source):
        target = staging / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    write_json_atomic(staging / BEST_RECORD, {
        "round": summary["scored_round"], "mean_dice": summary["mean_dice"], "n_cases": summary["n_cases"],
        "per_site": summary["per_site"], "fold": summary["fold"],
    })
    retired = None
    if best.exists():
        retired = Path(tempfile.mkdtemp(prefix=".best-old.", dir=run_dir))
        best.rename(retired / BEST_DIR)
    staging.rename(best)
    if retired is not None:
        shutil.rmtree(retired)
    if log is not None:
        log(f"best round is now {summary['scored_round']} (case-weighted validation Dice {summary['mean_dice']:.4f})")
    return True


def read_best(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / BEST_DIR / BEST_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _model_files(round_folder: Path) -> Sequence[Path]:
    """The model files (and their signatures) of a round folder; never the sites' updates."""
    return sorted(
        p for p in round_folder.rglob("*")
        if p.is_file() and p.name.endswith((".safetensors", ".safetensors.sig")) and "updates" not in p.relative_to(round_folder).parts
    )

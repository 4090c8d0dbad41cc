"""Score a folder of predictions against a folder of references (`fedseg evaluate`).

No torch: evaluation reads label maps and runs numpy/scipy metrics only.

Result layout (JSON-able once NaN is turned into null by `to_jsonable`/`save_metrics`):

    {
      "labels": {"background": 0, "lesion": 1},
      "n_cases": 2,
      "per_case": [{"case": "c1", "prediction": ".../c1.nii.gz", "reference": ".../c1.nii.gz",
                    "metrics": {"background": {"dice", "iou", "accuracy", "hd95"}, "lesion": {...}}}],
      "mean": {"background": {...}, "lesion": {...}},      # over cases, NaN excluded
      "foreground_mean": {"dice", "iou", "accuracy", "hd95"}  # mean of the non-background label means
    }

A label whose value is NaN in every case has a NaN mean (null in JSON). As nnU-Net does,
"foreground_mean" averages the per-label means, so every structure weighs the same.

Region-based labels (a label naming a list of values, fedseg.data.labels): as nnU-Net, each
foreground region is scored on its mask (`np.isin(map, region)`) in prediction and reference;
background is not scored, and "labels" lists the regions as dataset.json does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from fedseg.atomic import write_text_atomic
from fedseg.data.case_loading import label_map_as_int16
from fedseg.data.image_header import DEFAULT_MAX_VOXELS, check_voxel_limit
from fedseg.data.image_io import file_ending_of, geometries_agree, read_image
from fedseg.errors import InputError
from fedseg.training.metrics import METRIC_NAMES, case_metrics


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: dict[str, int],
    file_ending: str,
    progress: Callable[..., None] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> dict[str, Any]:
    """Score every reference `{CASE}{ending}` in `ref_dir` against `pred_dir/{CASE}{ending}`.

    Raises InputError (naming the file) when a reference has no prediction, when a
    prediction's shape or spacing differs from its reference, or when a file is unreadable.
    Predictions without a reference are ignored. `progress(1, info=case)` is called per case.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder, what in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise InputError(f"{what} folder does not exist", folder)
    if not labels:
        raise InputError("no labels given to evaluate")
    references = sorted(p for p in ref_dir.iterdir() if p.is_file() and p.name.endswith(file_ending))
    if not references:
        raise InputError(f"no reference files ending in {file_ending}", ref_dir)
    # Check every pairing before any (slow) scoring, so a missing file fails fast.
    pairs = []
    for ref_path in references:
        case = ref_path.name[: -len(file_ending)]
        pred_path = pred_dir / ref_path.name
        if not pred_path.is_file():
            raise InputError(f"case {case}: no prediction for reference {ref_path}", pred_path)
        pairs.append((case, pred_path, ref_path))
        for path in (ref_path, pred_path):
            check_voxel_limit(path, file_ending_of(path), max_voxels)

    scored = scored_labels(labels)
    per_case = []
    for case, pred_path, ref_path in pairs:
        per_case.append(_score_case(case, pred_path, ref_path, scored, max_voxels))
        if progress is not None:
            progress(1, info=case)

    mean = {
        name: {metric: nanmean([c["metrics"][name][metric] for c in per_case]) for metric in METRIC_NAMES}
        for name, _ in scored
    }
    foreground = [name for name, members in scored if members != (0,)]
    foreground_mean = {metric: nanmean([mean[name][metric] for name in foreground]) for metric in METRIC_NAMES}
    return {
        "labels": {name: members[0] if len(members) == 1 else list(members) for name, members in scored},
        "n_cases": len(per_case),
        "per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground_mean,
    }


def scored_labels(labels: dict[str, int | list[int]]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, label values of its mask) for everything scored: every label by value, or, with
    regions, every foreground region in dataset.json order."""
    groups = [(str(name), tuple(int(v) for v in value) if isinstance(value, list) else (int(value),))
              for name, value in labels.items()]
    if any(len(members) > 1 for _, members in groups):
        return [(name, members) for name, members in groups if members != (0,)]
    return sorted(groups, key=lambda group: group[1])


def _score_case(
    case: str, pred_path: Path, ref_path: Path, scored: list[tuple[str, tuple[int, ...]]],
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> dict[str, Any]:
    ref, ref_geo = read_image(ref_path, max_voxels, as_float=False)
    pred, pred_geo = read_image(pred_path, max_voxels, as_float=False)
    if pred_geo.shape != ref_geo.shape:
        raise InputError(
            f"case {case}: prediction shape {pred_geo.shape} differs from reference shape {ref_geo.shape}", pred_path
        )
    if not geometries_agree(pred_geo, ref_geo):
        raise InputError(
            f"case {case}: prediction spacing {pred_geo.spacing} differs from reference spacing {ref_geo.spacing}",
            pred_path,
        )
    pred = label_map_as_int16(pred, f"case {case}: label map", pred_path)
    ref = label_map_as_int16(ref, f"case {case}: label map", ref_path)
    if all(len(members) == 1 for _, members in scored):
        by_value = case_metrics(pred, ref, [members[0] for _, members in scored], ref_geo.spacing)
        metrics = {name: by_value[members[0]] for name, members in scored}
    else:   # regions: each scored on its own mask
        metrics = {
            name: case_metrics(np.isin(pred, members).astype(np.int8), np.isin(ref, members).astype(np.int8),
                               [1], ref_geo.spacing)[1]
            for name, members in scored
        }
    return {
        "case": case,
        "prediction": str(pred_path),
        "reference": str(ref_path),
        "metrics": metrics,
    }


def nanmean(values: list[float]) -> float:
    """Mean ignoring NaN; NaN when nothing is left (without numpy's empty-slice warning)."""
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def to_jsonable(obj: Any) -> Any:
    """A copy of `obj` with every NaN/inf float replaced by None (null in JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def save_metrics(result: dict[str, Any], path: str | Path) -> None:
    """Write an evaluation result as JSON atomically, NaN as null (strict JSON)."""
    write_text_atomic(path, json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")


def format_table(result: dict[str, Any], name: str | None = None) -> Table:
    """A rich table of the per-label means and the foreground mean, for the CLI; `name` (the
    site or dataset evaluated) heads the title."""
    cases = f"mean over {result.get('n_cases', len(result['per_case']))} case(s)"
    table = Table(title=f"{name}: {cases}" if name else cases[0].upper() + cases[1:])
    table.add_column("label")
    for header in ("Dice", "IoU", "Accuracy", "HD95 (mm)"):
        table.add_column(header, justify="right")

    def cells(metrics: dict[str, float]) -> list[str]:
        return [_fmt(metrics["dice"], 4), _fmt(metrics["iou"], 4), _fmt(metrics["accuracy"], 4), _fmt(metrics["hd95"], 2)]

    for name, metrics in result["mean"].items():
        table.add_row(name, *cells(metrics))
    table.add_section()
    table.add_row("foreground mean", *cells(result["foreground_mean"]), style="bold")
    return table


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"

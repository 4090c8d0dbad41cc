"""A site's dataset fingerprint: what planning needs to know, and nothing that shows a voxel.

nnU-Net's fingerprint (DatasetFingerprintExtractor) records, per training case, the spacing,
the shape after cropping to the nonzero region and the relative size of that crop, and over
all cases the foreground (label > 0) intensity statistics per channel. fedseg records the
same per-case lists, but replaces nnU-Net's pooled foreground samples with *mergeable
sufficient statistics* per channel — weight, weighted sum and sum of squares, min, max and a
quantile sketch (fedseg.planning.sketch) — so the coordinator can merge the fingerprints of
all sites into exactly the fingerprint of the pooled data (fedseg.planning.merge).

Weighting: nnU-Net draws 1e8 / N random foreground voxels from each case (with replacement,
seed 1234; cases without foreground contribute none) and computes its statistics on those
samples, which gives every case with foreground the same weight, whatever its foreground
size. fedseg computes that weighting exactly, without sampling: every foreground voxel of a
case gets weight 1 / (the case's foreground voxel count), so each case with foreground
weighs 1 ("case_weighted" below; the merged fingerprint's nnU-Net keys). It also keeps the
statistics with every voxel weighted equally (the exact pooled statistics of all foreground
voxels). Both come from the same per-case sketch: the voxels are bucketed once per case.

What leaves the site: spacings, cropped shapes, relative crop sizes (no case names), per channel
the foreground count, sum, sum of squares, min, max and a histogram with 0.5 %-wide
logarithmic buckets, and the same moments and histogram with per-case weights. No voxel
array, no image, no label map.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fedseg.bounds import MAX_AXIS, MAX_LABEL, MAX_SITE_CASES, MAX_SPACING, bounded_float, bounded_int, short
from fedseg.data.case_loading import check_case_sizes, load_case
from fedseg.data.cropping import bbox_of_mask, bbox_to_slices
from fedseg.data.dataset import Case, Dataset
from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.data.labels import parse_labels
from fedseg.errors import InputError
from fedseg.names import check_site_name
from fedseg.planning.sketch import DEFAULT_ALPHA, QuantileSketch

FINGERPRINT_FORMAT = "fedseg.fingerprint"
# 2: per channel a "case_weighted" entry (nnU-Net's weighting) next to the voxel-weighted stats.
FINGERPRINT_FORMAT_VERSION = 2

# progress(n, info): called with (1, case_id) after each case, like the CLI's `advance(n=1, info="")`.
ProgressFn = Callable[[int, str], None]


@dataclass
class CaseSummary:
    """What one case contributes to its site's fingerprint (computed in a worker process)."""

    case_id: str
    spacing: list[float]
    shape_after_crop: list[int]
    relative_size_after_crop: float
    is_2d: bool
    foreground: list[QuantileSketch]   # one per channel, unweighted (the case's foreground voxels)


def nonzero_bbox(data: np.ndarray) -> list[list[int]]:
    """nnU-Net's crop box: the bounding box of the hole-filled "any channel != 0" mask.

    Filling holes never changes the bounding box — a hole is, by definition, a zero region not
    connected to the array border, and every voxel outside the box of the nonzero voxels is
    connected to the border through the all-zero slab beyond that box — so the fingerprint
    skips scipy's binary_fill_holes (the most expensive step of nnU-Net's crop) and gets the
    identical box. An all-zero image keeps its full extent, as in nnU-Net.
    """
    mask = data[0] != 0
    for channel in data[1:]:
        mask |= channel != 0
    return bbox_of_mask(mask)


def summarize_case(
    case: Case, label_values: list[int], alpha: float = DEFAULT_ALPHA, max_voxels: int = DEFAULT_MAX_VOXELS
) -> CaseSummary:
    """Load and validate one case, crop it like nnU-Net, and sketch its foreground per channel."""
    loaded = load_case(case, label_values, max_voxels=max_voxels)
    data, seg = loaded.data, loaded.seg
    if seg is None:
        raise InputError(f"case {case.case_id}: training case has no label file", case.images[0])
    bbox = nonzero_bbox(data)
    slices = bbox_to_slices(bbox)
    shape_before = data.shape[1:]
    shape_after = [hi - lo for lo, hi in bbox]
    # Foreground = label > 0 inside the crop, as nnU-Net (it samples from the cropped seg).
    foreground = seg[slices] > 0
    sketches = [QuantileSketch(alpha).add(channel[slices][foreground]) for channel in data]
    return CaseSummary(
        case_id=case.case_id,
        spacing=[float(s) for s in loaded.geometry.spacing],
        shape_after_crop=[int(s) for s in shape_after],
        relative_size_after_crop=float(np.prod(shape_after, dtype=np.float64) / np.prod(shape_before, dtype=np.float64)),
        is_2d=bool(loaded.geometry.is_2d),
        foreground=sketches,
    )


def _summarize_in_worker(
    case: Case, label_values: list[int], alpha: float, max_voxels: int
) -> CaseSummary | tuple[str, str | None]:
    # InputError does not survive pickling with its path; send (message, path) back instead.
    try:
        return summarize_case(case, label_values, alpha, max_voxels)
    except InputError as exc:
        return (exc.detail, str(exc.path) if exc.path is not None else None)


def compute_fingerprint(
    dataset: Dataset,
    site: str,
    workers: int = 1,
    progress: ProgressFn | None = None,
    alpha: float = DEFAULT_ALPHA,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> dict[str, Any]:
    """The fingerprint of a site's training cases (JSON-able dict, no voxel values).

    Every file's header is checked against `max_voxels` before the first case is read.

    Cases are summarised in parallel when `workers > 1` and combined in case-id order, so
    the result is identical for every worker count. `progress(1, case_id)` is called after
    each case. Any bad case raises InputError naming its file.
    """
    check_site_name(site)
    cases = dataset.cases("Tr")
    check_case_sizes(cases, max_voxels)
    label_values = dataset.label_values
    summaries: list[CaseSummary] = []
    total = len(cases)

    def collect(result: CaseSummary | tuple[str, str | None]) -> None:
        if isinstance(result, tuple):
            raise InputError(result[0], result[1])
        summaries.append(result)
        if progress is not None:
            progress(1, result.case_id)

    if workers <= 1 or total <= 1:
        for case in cases:
            collect(_summarize_in_worker(case, label_values, alpha, max_voxels))
    else:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about forking a process with threads; see _pool_context.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=_pool_context()) as pool:
                for result in pool.map(_summarize_in_worker, cases, [label_values] * total, [alpha] * total, [max_voxels] * total):
                    collect(result)
    return _assemble(dataset, site, summaries, alpha)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe, else forkserver/spawn.

    A forked worker starts in milliseconds; forkserver and spawn re-import numpy, SciPy and
    SimpleITK in every worker (about a second each), which would cost more than a small site's
    whole fingerprint. The workers only use numpy and SimpleITK, whose thread pools (OpenBLAS,
    ITK) are fork-safe; torch's OpenMP runtime is not, so once torch is loaded in this process
    the workers are started fresh instead.
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _assemble(dataset: Dataset, site: str, summaries: list[CaseSummary], alpha: float) -> dict[str, Any]:
    dims = {s.is_2d for s in summaries}
    if len(dims) > 1:
        mixed = next(s for s in summaries if s.is_2d != summaries[0].is_2d)
        raise InputError(f"case {mixed.case_id}: the dataset mixes 2D and 3D images", dataset.root)
    per_channel = {
        str(c): channel_stats([summary.foreground[c] for summary in summaries], alpha)
        for c in range(dataset.n_channels)
    }
    return {
        "format": FINGERPRINT_FORMAT,
        "format_version": FINGERPRINT_FORMAT_VERSION,
        "site": site,
        "dataset_name": dataset.name,
        "modality": dataset.modality,
        "channel_names": dict(dataset.channel_names),
        "labels": dict(dataset.labels),
        "file_ending": dataset.file_ending,
        "image_dim": 2 if summaries[0].is_2d else 3,
        "n_cases": len(summaries),
        "spacings": [s.spacing for s in summaries],
        "shapes_after_crop": [s.shape_after_crop for s in summaries],
        "relative_sizes_after_crop": [s.relative_size_after_crop for s in summaries],
        "foreground_stats_per_channel": per_channel,
        # only for region-based labels, so a plain dataset's fingerprint keeps its keys
        **({"regions_class_order": list(dataset.regions_class_order)} if dataset.regions_class_order else {}),
    }


def channel_stats(case_sketches: list[QuantileSketch], alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """One channel's mergeable foreground statistics from its per-case (unweighted) sketches.

    Voxel-weighted: the sum of the case sketches. Case-weighted (nnU-Net's weighting): each
    case with foreground merged with weight 1 / its voxel count, so it weighs 1 in total; the
    buckets computed for the case are reused, no voxel is looked at again. Cases without
    foreground are skipped, as nnU-Net samples nothing from them. Cases are combined in the
    given order, so the float sums come out the same every run.
    """
    voxels = QuantileSketch(alpha)
    cases = QuantileSketch(alpha, weighted=True)
    n_with_foreground = 0
    for sketch in case_sketches:
        voxels.merge(sketch)
        if sketch.count:
            cases.merge(sketch, weight=1.0 / sketch.count)
            n_with_foreground += 1
    return {
        "count": voxels.count,
        "sum": voxels.sum,
        "sumsq": voxels.sumsq,
        "min": voxels.min if voxels.count else None,
        "max": voxels.max if voxels.count else None,
        "sketch": voxels.to_dict(),
        "case_weighted": {
            "cases": n_with_foreground,
            "weight": cases.weight,
            "sum": cases.sum,
            "sumsq": cases.sumsq,
            "sketch": cases.to_dict(),
        },
    }


def save_fingerprint(fp: dict[str, Any], path: str | Path) -> None:
    """Write a fingerprint as JSON, atomically."""
    from fedseg.atomic import write_json_atomic

    write_json_atomic(path, fp)


def load_fingerprint(path: str | Path) -> dict[str, Any]:
    """Read and validate a fingerprint file; InputError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError("fingerprint file not found", path)
    try:
        fp = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # ValueError: also an integer of more than 4300 digits; RecursionError: absurd nesting
        raise InputError(f"not a fedseg fingerprint (invalid JSON: {str(exc)[:120]})", path) from None
    validate_fingerprint(fp, path)
    return fp


def validate_fingerprint(fp: Any, source: str | Path | None = None) -> None:
    """Check a fingerprint's structure and internal consistency; InputError naming `source`."""
    def fail(reason: str) -> NoReturn:
        raise InputError(f"not a valid fedseg fingerprint ({reason})", source)

    if not isinstance(fp, dict) or fp.get("format") != FINGERPRINT_FORMAT:
        fail("no 'format': 'fedseg.fingerprint' key")
    if fp.get("format_version") != FINGERPRINT_FORMAT_VERSION:
        fail(f"format_version {fp.get('format_version')!r}, expected {FINGERPRINT_FORMAT_VERSION}; "
             "recompute it with `fedseg fingerprint`")
    required = ("site", "channel_names", "labels", "file_ending", "image_dim", "n_cases", "spacings",
                "shapes_after_crop", "relative_sizes_after_crop", "foreground_stats_per_channel", "modality")
    missing = [k for k in required if k not in fp]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    check_site_name(fp["site"], source)
    try:
        parse_labels(fp["labels"], fp.get("regions_class_order"))
    except InputError as exc:
        fail(exc.detail)
    if not isinstance(fp["channel_names"], dict) or not fp["channel_names"]:
        fail("channel_names must be a non-empty object")
    if fp["image_dim"] not in (2, 3):
        fail("image_dim must be 2 or 3")
    n = fp["n_cases"]
    if not bounded_int(n, 1, MAX_SITE_CASES):
        fail(f"n_cases must be an integer from 1 to {MAX_SITE_CASES:,}, not {short(n)}")
    for key in ("spacings", "shapes_after_crop", "relative_sizes_after_crop"):
        if not isinstance(fp[key], list) or len(fp[key]) != n:
            fail(f"{key} must be a list of n_cases = {n} entries")
    for key in ("spacings", "shapes_after_crop"):
        if not all(isinstance(v, list) and len(v) == 3 for v in fp[key]):
            fail(f"every entry of {key} must have 3 numbers (z, y, x)")
    _check_numbers(fp, fail)
    stats = fp["foreground_stats_per_channel"]
    if not isinstance(stats, dict) or sorted(stats) != sorted(fp["channel_names"]):
        fail("foreground_stats_per_channel must have one entry per channel")
    for channel, entry in stats.items():
        if not isinstance(entry, dict):
            fail(f"channel {channel}: statistics must be an object")
        _validate_channel(entry, n, lambda reason, ch=channel: fail(f"channel {ch}: {reason}"))


def _check_numbers(fp: dict[str, Any], fail: Callable[[str], NoReturn]) -> None:
    """Bound every per-case number (fedseg.bounds): they come from another site, and the
    planner computes medians, products and percentiles from them."""
    if not all(bounded_float(s, 0.0, MAX_SPACING) and s > 0 for v in fp["spacings"] for s in v):
        fail(f"spacings must be finite positive numbers up to {MAX_SPACING:g} mm")
    if not all(bounded_int(s, 0, MAX_AXIS) for v in fp["shapes_after_crop"] for s in v):
        fail(f"shapes_after_crop must be integers from 0 to {MAX_AXIS:,}")
    if not all(bounded_float(r, 0.0, 1.0) for r in fp["relative_sizes_after_crop"]):
        fail("relative_sizes_after_crop must be numbers from 0 to 1")
    # a label is one value, or a region: a list of values (fedseg.data.labels)
    values = [x for v in fp["labels"].values() for x in (v if isinstance(v, list) else [v])]
    if not all(bounded_int(x, 0, MAX_LABEL) for x in values):
        fail(f"label values must be integers from 0 to {MAX_LABEL:,}")


def _validate_channel(entry: dict[str, Any], n_cases: int, fail: Callable[[str], NoReturn]) -> None:
    try:
        sketch = QuantileSketch.from_dict(entry["sketch"])
    except (KeyError, TypeError, ValueError) as exc:
        fail(f"bad sketch ({exc})")
    if sketch.weighted:
        fail("the voxel-weighted sketch is weighted")
    expected = {"count": sketch.count, "sum": sketch.sum, "sumsq": sketch.sumsq,
                "min": sketch.min if sketch.count else None, "max": sketch.max if sketch.count else None}
    if any(entry.get(k) != v for k, v in expected.items()):
        fail("count/sum/sumsq/min/max disagree with its sketch")
    by_case = entry.get("case_weighted")
    if not isinstance(by_case, dict):
        fail("no 'case_weighted' statistics")
    try:
        weighted = QuantileSketch.from_dict(by_case["sketch"])
    except (KeyError, TypeError, ValueError) as exc:
        fail(f"bad case-weighted sketch ({exc})")
    if not weighted.weighted or weighted.alpha != sketch.alpha:
        fail("the case-weighted sketch must be weighted, with the accuracy of the voxel-weighted one")
    cases = by_case.get("cases")
    if isinstance(cases, bool) or not isinstance(cases, int) or not 0 <= cases <= n_cases:
        fail(f"case_weighted.cases must be an integer from 0 to n_cases = {n_cases}")
    if any(by_case.get(k) != v for k, v in {"weight": weighted.weight, "sum": weighted.sum,
                                            "sumsq": weighted.sumsq}.items()):
        fail("case_weighted weight/sum/sumsq disagree with its sketch")
    # every case with foreground weighs 1 (up to the float rounding of count * (1 / count))
    if abs(weighted.weight - cases) > 1e-9 * max(cases, 1) or (cases == 0) != (sketch.count == 0):
        fail(f"case_weighted weight {weighted.weight} is not its number of cases with foreground ({cases})")
    if (weighted.count, weighted.min, weighted.max) != (sketch.count, sketch.min, sketch.max):
        fail("case-weighted and voxel-weighted sketches hold different voxels")


def foreground_sketch(fp: dict[str, Any], channel: str, case_weighted: bool = False) -> QuantileSketch:
    """The foreground sketch of one channel of a (validated) fingerprint (voxel- or case-weighted)."""
    entry = fp["foreground_stats_per_channel"][channel]
    return QuantileSketch.from_dict((entry["case_weighted"] if case_weighted else entry)["sketch"])

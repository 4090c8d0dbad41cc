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

This module computes fingerprints (it reads images); their file format, validation, reading
and writing are fedseg.planning.fingerprint_file, re-exported here, which the coordinator
uses without loading any image library.
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedseg.data.case_loading import check_case_sizes, load_case
from fedseg.data.cropping import bbox_of_mask, bbox_to_slices
from fedseg.data.dataset import Case, Dataset
from fedseg.data.voxel_limit import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError
from fedseg.names import check_site_name
from fedseg.planning.fingerprint_file import (
    FINGERPRINT_FORMAT,
    FINGERPRINT_FORMAT_VERSION,
    foreground_sketch,
    load_fingerprint,
    save_fingerprint,
    validate_fingerprint,
)
from fedseg.planning.sketch import DEFAULT_ALPHA, QuantileSketch

__all__ = [
    "FINGERPRINT_FORMAT", "FINGERPRINT_FORMAT_VERSION", "CaseSummary", "ProgressFn", "channel_stats",
    "compute_fingerprint", "foreground_sketch", "load_fingerprint", "nonzero_bbox", "save_fingerprint",
    "summarize_case", "validate_fingerprint",
]

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

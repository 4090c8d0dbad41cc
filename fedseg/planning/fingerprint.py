"""A site's dataset fingerprint: what planning needs to know, and nothing that shows a voxel.

nnU-Net's fingerprint (DatasetFingerprintExtractor) records, per training case, the spacing,
the shape after cropping to the nonzero region and the relative size of that crop, and over
all cases the foreground (label > 0) intensity statistics per channel. fedseg records the
same per-case lists, but replaces nnU-Net's pooled foreground samples with *mergeable
sufficient statistics* per channel — count, sum, sum of squares, min, max and a quantile
sketch (fedseg.planning.sketch) — so the coordinator can merge the fingerprints of all sites
into exactly the fingerprint of the pooled data (fedseg.planning.merge).

Foreground voxels: nnU-Net draws 1e8 / N random foreground voxels per case (with
replacement, seed 1234) and computes statistics on those samples, which gives every case the
same weight. fedseg uses ALL foreground voxels of every case: no sampling noise, and cheaper
than drawing 1e8 samples — but each voxel (not each case) has equal weight, so a case with a
large foreground counts more than in nnU-Net. For cases of similar foreground size the two
agree up to nnU-Net's sampling noise.

What leaves the site: spacings, cropped shapes, relative crop sizes, case ids, per channel
the foreground count, sum, sum of squares, min, max and a histogram with 0.5 %-wide
logarithmic buckets. No voxel array, no image, no label map.
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
from typing import Any

import numpy as np

from fedseg.data.case_loading import load_case
from fedseg.data.cropping import bbox_of_mask, bbox_to_slices
from fedseg.data.dataset import Case, Dataset
from fedseg.errors import InputError
from fedseg.planning.sketch import DEFAULT_ALPHA, QuantileSketch

FINGERPRINT_FORMAT = "fedseg.fingerprint"
FINGERPRINT_FORMAT_VERSION = 1

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
    foreground: list[QuantileSketch]   # one per channel


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


def summarize_case(case: Case, label_values: list[int], alpha: float = DEFAULT_ALPHA) -> CaseSummary:
    """Load and validate one case, crop it like nnU-Net, and sketch its foreground per channel."""
    loaded = load_case(case, label_values)
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


def _summarize_in_worker(case: Case, label_values: list[int], alpha: float) -> CaseSummary | tuple[str, str | None]:
    # InputError does not survive pickling with its path; send (message, path) back instead.
    try:
        return summarize_case(case, label_values, alpha)
    except InputError as exc:
        return (exc.detail, str(exc.path) if exc.path is not None else None)


def compute_fingerprint(
    dataset: Dataset,
    site: str,
    workers: int = 1,
    progress: ProgressFn | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, Any]:
    """The fingerprint of a site's training cases (JSON-able dict, no voxel values).

    Cases are summarised in parallel when `workers > 1` and combined in case-id order, so
    the result is identical for every worker count. `progress(1, case_id)` is called after
    each case. Any bad case raises InputError naming its file.
    """
    if not site or not isinstance(site, str):
        raise InputError("site name must be a non-empty string")
    cases = dataset.cases("Tr")
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
            collect(_summarize_in_worker(case, label_values, alpha))
    else:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about forking a process with threads; see _pool_context.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=_pool_context()) as pool:
                for result in pool.map(_summarize_in_worker, cases, [label_values] * total, [alpha] * total):
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
    per_channel = {}
    for c in range(dataset.n_channels):
        merged = QuantileSketch(alpha)
        for summary in summaries:           # case order: the float sums come out the same every run
            merged.merge(summary.foreground[c])
        per_channel[str(c)] = {
            "count": merged.count,
            "sum": merged.sum,
            "sumsq": merged.sumsq,
            "min": merged.min if merged.count else None,
            "max": merged.max if merged.count else None,
            "sketch": merged.to_dict(),
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
        "case_ids": [s.case_id for s in summaries],
        "spacings": [s.spacing for s in summaries],
        "shapes_after_crop": [s.shape_after_crop for s in summaries],
        "relative_sizes_after_crop": [s.relative_size_after_crop for s in summaries],
        "foreground_stats_per_channel": per_channel,
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a fedseg fingerprint (invalid JSON: {exc})", path) from None
    validate_fingerprint(fp, path)
    return fp


def validate_fingerprint(fp: Any, source: str | Path | None = None) -> None:
    """Check a fingerprint's structure and internal consistency; InputError naming `source`."""
    def fail(reason: str) -> None:
        raise InputError(f"not a valid fedseg fingerprint ({reason})", source)

    if not isinstance(fp, dict) or fp.get("format") != FINGERPRINT_FORMAT:
        fail("no 'format': 'fedseg.fingerprint' key")
    if fp.get("format_version") != FINGERPRINT_FORMAT_VERSION:
        fail(f"format_version {fp.get('format_version')!r}, expected {FINGERPRINT_FORMAT_VERSION}")
    required = ("site", "channel_names", "labels", "file_ending", "image_dim", "n_cases", "case_ids", "spacings",
                "shapes_after_crop", "relative_sizes_after_crop", "foreground_stats_per_channel", "modality")
    missing = [k for k in required if k not in fp]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    if not isinstance(fp["site"], str) or not fp["site"]:
        fail("site must be a non-empty string")
    if not isinstance(fp["labels"], dict) or not all(isinstance(v, int) for v in fp["labels"].values()):
        fail("labels must map names to integers")
    if not isinstance(fp["channel_names"], dict) or not fp["channel_names"]:
        fail("channel_names must be a non-empty object")
    if fp["image_dim"] not in (2, 3):
        fail("image_dim must be 2 or 3")
    n = fp["n_cases"]
    if not isinstance(n, int) or n < 1:
        fail("n_cases must be a positive integer")
    for key in ("case_ids", "spacings", "shapes_after_crop", "relative_sizes_after_crop"):
        if not isinstance(fp[key], list) or len(fp[key]) != n:
            fail(f"{key} must be a list of n_cases = {n} entries")
    for key in ("spacings", "shapes_after_crop"):
        if not all(isinstance(v, list) and len(v) == 3 for v in fp[key]):
            fail(f"every entry of {key} must have 3 numbers (z, y, x)")
    if not all(isinstance(s, (int, float)) and s > 0 for v in fp["spacings"] for s in v):
        fail("spacings must be positive numbers")
    stats = fp["foreground_stats_per_channel"]
    if not isinstance(stats, dict) or sorted(stats) != sorted(fp["channel_names"]):
        fail("foreground_stats_per_channel must have one entry per channel")
    for channel, entry in stats.items():
        try:
            sketch = QuantileSketch.from_dict(entry["sketch"])
        except (KeyError, TypeError, ValueError) as exc:
            fail(f"channel {channel}: bad sketch ({exc})")
        expected = {"count": sketch.count, "sum": sketch.sum, "sumsq": sketch.sumsq,
                    "min": sketch.min if sketch.count else None, "max": sketch.max if sketch.count else None}
        if any(entry.get(k) != v for k, v in expected.items()):
            fail(f"channel {channel}: count/sum/sumsq/min/max disagree with its sketch")


def foreground_sketch(fp: dict[str, Any], channel: str) -> QuantileSketch:
    """The foreground sketch of one channel of a (validated) fingerprint."""
    return QuantileSketch.from_dict(fp["foreground_stats_per_channel"][channel]["sketch"])

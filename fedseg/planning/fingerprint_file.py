"""A fingerprint as a file: its format, its validation, reading and writing it.

Apart from the computation (fedseg.planning.fingerprint), which reads images: the coordinator
loads, validates and merges fingerprints without any image library, so `fedseg aggregate` and
planning stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from fedseg.atomic import write_json_atomic
from fedseg.bounds import MAX_AXIS, MAX_LABEL, MAX_SITE_CASES, MAX_SPACING, bounded_float, bounded_int, short
from fedseg.data.labels import parse_labels
from fedseg.errors import InputError
from fedseg.names import check_site_name
from fedseg.planning.sketch import QuantileSketch

FINGERPRINT_FORMAT = "fedseg.fingerprint"
# 2: per channel a "case_weighted" entry (nnU-Net's weighting) next to the voxel-weighted stats.
FINGERPRINT_FORMAT_VERSION = 2


def save_fingerprint(fp: dict[str, Any], path: str | Path) -> None:
    """Write a fingerprint as JSON, atomically."""
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

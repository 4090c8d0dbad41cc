"""Load one case (all channels + label) and check it is consistent before anything uses it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.data.dataset import Case
from fedseg.data.image_io import Geometry, geometries_agree, read_image
from fedseg.errors import InputError


@dataclass
class CaseData:
    case_id: str
    data: np.ndarray          # (C, z, y, x) float32
    seg: np.ndarray | None    # (z, y, x) int16, or None for unlabelled cases
    geometry: Geometry


def load_case(case: Case, label_values: list[int] | None = None, check_finite: bool = True) -> CaseData:
    """Read every channel and the label; raise InputError naming the file on any inconsistency.

    Checks: readable files, all channels and the label share shape and spacing, finite
    intensities, and (given `label_values`) no label value outside dataset.json's labels.
    """
    channels = []
    geometry: Geometry | None = None
    for path in case.images:
        array, geo = read_image(path)
        if geometry is None:
            geometry = geo
        elif not geometries_agree(geometry, geo):
            raise InputError(
                f"case {case.case_id}: channel shape/spacing {geo.shape}/{_fmt(geo.spacing)} differs from "
                f"channel 0 {geometry.shape}/{_fmt(geometry.spacing)}",
                path,
            )
        if check_finite and not np.isfinite(array).all():
            raise InputError(f"case {case.case_id}: image contains NaN or infinite values", path)
        channels.append(array)
    assert geometry is not None
    seg = None
    if case.label is not None:
        label_array, label_geo = read_image(case.label)
        if label_geo.shape != geometry.shape:
            raise InputError(
                f"case {case.case_id}: label shape {label_geo.shape} differs from image shape {geometry.shape}",
                case.label,
            )
        if not geometries_agree(geometry, label_geo):
            raise InputError(
                f"case {case.case_id}: label spacing {_fmt(label_geo.spacing)} differs from image spacing "
                f"{_fmt(geometry.spacing)}",
                case.label,
            )
        if not np.isfinite(label_array).all():
            raise InputError(f"case {case.case_id}: label contains NaN or infinite values", case.label)
        rounded = np.rint(label_array)
        if not np.array_equal(rounded, label_array):
            raise InputError(f"case {case.case_id}: label has non-integer values", case.label)
        seg = rounded.astype(np.int16)
        if label_values is not None:
            present = np.unique(seg)
            unknown = sorted(set(present.tolist()) - set(label_values))
            if unknown:
                raise InputError(
                    f"case {case.case_id}: label value(s) {unknown} not in dataset.json labels {label_values}",
                    case.label,
                )
    return CaseData(case.case_id, np.stack(channels), seg, geometry)


def _fmt(spacing: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{s:g}" for s in spacing) + ")"

"""Load one case (all channels + label) and check it is consistent before anything uses it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.data.dataset import Case
from fedseg.data.image_header import check_voxel_limit
from fedseg.data.image_io import Geometry, file_ending_of, geometries_agree, read_channels, read_image
from fedseg.data.voxel_limit import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError


@dataclass
class CaseData:
    case_id: str
    data: np.ndarray          # (C, z, y, x) float32
    seg: np.ndarray | None    # (z, y, x) int16, or None for unlabelled cases
    geometry: Geometry


def check_case_sizes(cases: list[Case], max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """Refuse (InputError naming the file) any image or label whose header declares more than
    `max_voxels` voxels, before the first case is read: a command then fails before it writes
    anything. Costs one header read per file."""
    for case in cases:
        for path in (*case.images, *((case.label,) if case.label is not None else ())):
            check_voxel_limit(path, file_ending_of(path), max_voxels)


def load_case(
    case: Case,
    label_values: list[int] | None = None,
    check_finite: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> CaseData:
    """Read every channel and the label; raise InputError naming the file on any inconsistency.

    Checks: no file above `max_voxels` (from its header, before reading), readable files, all
    channels and the label share shape and spacing, the files hold dataset.json's number of
    channels, finite intensities, and (given `label_values`) no label value outside
    dataset.json's labels.
    """
    data, geometry = _read_case_channels(case, check_finite, max_voxels)
    seg = _read_case_label(case, geometry, label_values, max_voxels) if case.label is not None else None
    return CaseData(case.case_id, data, seg, geometry)


def _read_case_channels(case: Case, check_finite: bool, max_voxels: int) -> tuple[np.ndarray, Geometry]:
    """Every channel file of a case as one (C, z, y, x) array and the geometry they share."""
    channels = []
    geometry: Geometry | None = None
    for path in case.images:
        array, geo = read_channels(path, max_voxels)
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
    n_held = sum(array.shape[0] for array in channels)
    if case.n_channels is not None and n_held != case.n_channels:
        raise InputError(
            f"case {case.case_id}: the files hold {n_held} channel(s), dataset.json declares {case.n_channels}",
            case.images[0],
        )
    # One file (the usual case, and every colour image) is already (C, z, y, x): no copy.
    data = channels[0] if len(channels) == 1 else np.concatenate(channels)
    return data, geometry


def _read_case_label(
    case: Case, geometry: Geometry, label_values: list[int] | None, max_voxels: int
) -> np.ndarray:
    """The case's label map as int16, checked against the images' geometry and the dataset's labels."""
    assert case.label is not None
    label_array, label_geo = read_image(case.label, max_voxels, as_float=False)
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
    seg = label_map_as_int16(label_array, f"case {case.case_id}: label", case.label)
    if label_values is not None:
        present = np.unique(seg)
        unknown = sorted(set(present.tolist()) - set(label_values))
        if unknown:
            raise InputError(
                f"case {case.case_id}: label value(s) {unknown} not in dataset.json labels {label_values}",
                case.label,
            )
    return seg


def label_map_as_int16(array: np.ndarray, what: str, path) -> np.ndarray:
    """A label map as int16, refusing NaN, non-integer and out-of-range values (InputError).

    An integer file converts directly; only a float file pays for the finiteness and
    integrality checks (each a temporary as large as the map)."""
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max):
            raise InputError(f"{what} has values outside the int16 range", path)
        return array.astype(np.int16, copy=False)
    if not np.isfinite(array).all():
        raise InputError(f"{what} contains NaN or infinite values", path)
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise InputError(f"{what} has non-integer values", path)
    return rounded.astype(np.int16)


def _fmt(spacing: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{s:g}" for s in spacing) + ")"

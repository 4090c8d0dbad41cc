"""Resample images and segmentations to a target spacing with nnU-Net's rules.

- Images: third-order spline (smooth, keeps edges sharper than linear).
- Segmentations: each label is resampled as a one-hot mask with linear interpolation and
  every voxel takes the label with the highest interpolated value. Interpolating labels
  directly would invent intermediate labels between e.g. 1 and 3; nearest neighbour would
  make staircase borders.
- Anisotropic data (largest spacing more than `anisotropy_threshold` times the smallest,
  e.g. 5 mm slices with 0.8 mm pixels): the in-plane axes are resampled slice by slice with
  the orders above and the low-resolution axis with nearest neighbour, because interpolating
  across thick slices smears structures that are not continuous between them.

Interpolation matches skimage.transform.resize(mode="edge", anti_aliasing=False, clip=True)
as nnU-Net calls it, done with scipy.ndimage.zoom on float32 arrays for speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

# nnU-Net's ANISO_THRESHOLD: a spacing ratio above 3 means slices are too thick to
# interpolate across.
DEFAULT_ANISOTROPY_THRESHOLD = 3.0
IMAGE_ORDER = 3          # nnU-Net resampling_fn_data: order 3
SEG_ORDER = 1            # nnU-Net resampling_fn_seg: order 1 (on one-hot masks)
PROBABILITY_ORDER = 1    # nnU-Net resampling_fn_probabilities: order 1
SEPARATE_Z_ORDER = 0     # nnU-Net order_z: nearest neighbour across thick slices


def compute_new_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape after resampling: round(shape * spacing / target_spacing) per axis, at least 1."""
    if not len(shape) == len(spacing) == len(target_spacing):
        raise ValueError(f"shape {shape}, spacing {spacing} and target {target_spacing} differ in length")
    return tuple(
        max(1, int(round(s * sp / tsp))) for s, sp, tsp in zip(shape, spacing, target_spacing)
    )


def lowres_axis(spacing: Sequence[float]) -> int | None:
    """The single axis with the largest spacing, or None when two or more axes share it."""
    spacing = np.asarray(spacing, dtype=float)
    axes = np.flatnonzero(spacing == spacing.max())
    return int(axes[0]) if len(axes) == 1 else None


def separate_z_axis(
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    anisotropy_threshold: float = DEFAULT_ANISOTROPY_THRESHOLD,
) -> int | None:
    """The axis to treat separately (nearest neighbour), or None for plain 3D resampling.

    As nnU-Net: the current spacing decides first, then the target spacing; if the largest
    spacing is shared by two axes there is no single low-resolution axis and nothing is
    separated.
    """
    for candidate in (spacing, target_spacing):
        candidate = np.asarray(candidate, dtype=float)
        if candidate.max() / candidate.min() > anisotropy_threshold:
            return lowres_axis(candidate)
    return None


def resample_data(
    data: np.ndarray,
    new_shape: Sequence[int],
    is_seg: bool,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    anisotropy_threshold: float = DEFAULT_ANISOTROPY_THRESHOLD,
    order: int | None = None,
) -> np.ndarray:
    """Resample (C, z, y, x) data to `new_shape` (z, y, x).

    `is_seg`: the channels hold integer labels (e.g. class indices with -1 outside the
    nonzero region); the result has the input dtype. Otherwise the result is float32.
    `order` overrides the in-plane / 3D interpolation order (default 3 for images, 1 for
    segmentations); pass 1 to resample probabilities as nnU-Net does on export.
    """
    if data.ndim != 4:
        raise ValueError(f"expected (C, z, y, x) data, got shape {data.shape}")
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != 3:
        raise ValueError(f"new_shape must have 3 entries, got {new_shape}")
    if order is None:
        order = SEG_ORDER if is_seg else IMAGE_ORDER
    if tuple(data.shape[1:]) == new_shape:
        return data.copy() if is_seg else data.astype(np.float32, copy=True)
    axis = separate_z_axis(spacing, target_spacing, anisotropy_threshold)
    channels = [
        _resample_channel(channel, new_shape, is_seg, order, axis) for channel in data
    ]
    return np.stack(channels)


def _resample_channel(
    volume: np.ndarray, new_shape: tuple[int, ...], is_seg: bool, order: int, axis: int | None
) -> np.ndarray:
    if axis is None:
        return _resize_seg(volume, new_shape, order) if is_seg else _resize(volume, new_shape, order)
    # In-plane slice by slice (the low-resolution axis keeps its size), then nearest along it.
    moved = np.moveaxis(volume, axis, 0)
    plane_shape = tuple(s for a, s in enumerate(new_shape) if a != axis)
    resize_plane = _resize_seg if is_seg else _resize
    planes = np.stack([resize_plane(plane, plane_shape, order) for plane in moved])
    planes = np.moveaxis(planes, 0, axis)
    return _nearest_along(planes, new_shape[axis], axis)


def _nearest_along(volume: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Nearest-neighbour resampling of one axis, with nnU-Net's pixel-centre mapping."""
    old = volume.shape[axis]
    if old == size:
        return volume
    # Output voxel centre i sits at input coordinate (i + 0.5) * old / size - 0.5 (as
    # skimage/nnU-Net map coordinates); order 0 takes the nearest input voxel.
    coords = (np.arange(size) + 0.5) * (old / size) - 0.5
    index = np.clip(np.floor(coords + 0.5).astype(np.int64), 0, old - 1)
    return np.take(volume, index, axis=axis)


def _resize(volume: np.ndarray, new_shape: tuple[int, ...], order: int) -> np.ndarray:
    """skimage.transform.resize(mode="edge", clip=True, anti_aliasing=False) in float32."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape == tuple(new_shape):
        return volume.copy()
    zoom = [n / o for n, o in zip(new_shape, volume.shape)]
    out = ndi.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(new_shape):  # guards against float rounding in scipy's shape computation
        raise AssertionError(f"zoom produced {out.shape}, expected {new_shape}")
    if order > 1:
        # Splines overshoot; like skimage's clip=True, keep values within the input range.
        np.clip(out, volume.min(), volume.max(), out=out)
    return out


def _resize_seg(labels: np.ndarray, new_shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample a label map through one-hot masks; each voxel takes the most likely label.

    With linear interpolation the one-hot values at any point sum to 1, so for two labels
    this is nnU-Net's "value >= 0.5" rule; ties go to the later (larger) label, as in
    nnU-Net where later labels overwrite earlier ones. Unlike thresholding, no voxel is left
    without a label when three or more labels meet.
    """
    if labels.shape == tuple(new_shape):
        return labels.copy()
    if order == 0:
        zoom = [n / o for n, o in zip(new_shape, labels.shape)]
        return ndi.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True).astype(labels.dtype)
    values = np.unique(labels)
    out = np.full(new_shape, values[0], dtype=labels.dtype)
    if len(values) == 1:
        return out
    best = np.full(new_shape, -np.inf, dtype=np.float32)
    for value in values:
        score = _resize((labels == value).astype(np.float32), new_shape, order)
        better = score >= best
        out[better] = value
        best[better] = score[better]
    return out

"""Crop a case to its nonzero region, as nnU-Net does before anything else.

Many scans carry a wide frame of exact zeros (skull-stripped MRI, padded CT). Cropping it
away makes every later step cheaper, and remembering where the region was (`bbox`) lets a
prediction be put back into the original image. The voxels of background that lie outside
the nonzero region are marked -1 in the segmentation: normalisation can then restrict its
statistics to the inside (nnU-Net's `use_mask_for_norm`), and training treats them as
background.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

# nnU-Net's marker for "background outside the nonzero region" in a cropped segmentation.
OUTSIDE_NONZERO_LABEL = -1

BBox = list[list[int]]


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, with enclosed holes filled.

    Holes are filled because a dark structure inside the body (air in the lungs, fluid) is
    still part of the body and must not be excluded from normalisation statistics.
    """
    if data.ndim != 4:
        raise ValueError(f"expected data of shape (C, z, y, x), got {data.shape}")
    mask = np.any(data != 0, axis=0)
    return binary_fill_holes(mask)


def bbox_of_mask(mask: np.ndarray) -> BBox:
    """Half-open bounding box [[lo, hi), ...] per axis of the True voxels; the whole array if none."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        if hits.size == 0:
            return [[0, int(s)] for s in mask.shape]
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def bbox_to_slices(bbox: BBox) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in bbox)


def crop_to_nonzero(
    data: np.ndarray, seg: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, BBox]:
    """Crop (C, z, y, x) data and its (z, y, x) segmentation to the nonzero region.

    Returns `(data, seg, bbox)` where `bbox` is [[lo, hi), ...] per spatial axis in the input's
    voxel grid. In the returned seg, background (0) voxels outside the nonzero mask are set to
    -1. As in nnU-Net, a seg is returned even when none is given: then it is 0 inside the
    nonzero region and -1 outside, which is what mask-based normalisation needs at inference.
    An image that is zero everywhere keeps its full extent and counts as all inside.
    The inputs are not modified.
    """
    mask = nonzero_mask(data)
    if not mask.any():
        # Nothing is nonzero: keep everything rather than crop to nothing.
        mask = np.ones_like(mask)
    bbox = bbox_of_mask(mask)
    slices = bbox_to_slices(bbox)
    cropped = data[(slice(None), *slices)]
    inside = mask[slices]
    if seg is None:
        out_seg = np.where(inside, 0, OUTSIDE_NONZERO_LABEL).astype(np.int16)
    else:
        if seg.shape != data.shape[1:]:
            raise ValueError(f"seg shape {seg.shape} does not match data shape {data.shape[1:]}")
        out_seg = seg[slices].astype(np.int16, copy=True)
        out_seg[(out_seg == 0) & ~inside] = OUTSIDE_NONZERO_LABEL
    return np.ascontiguousarray(cropped), out_seg, bbox

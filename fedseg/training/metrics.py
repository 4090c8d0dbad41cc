"""Segmentation metrics per label: Dice, IoU (Jaccard), pixel accuracy and HD95 in mm.

numpy + scipy only (no torch), so `fedseg evaluate` starts fast and runs anywhere.

Conventions (they decide what a mean over cases means, so they are fixed here):

* Each label value `l` is scored one-vs-rest: prediction mask `pred == l`, reference mask
  `ref == l`. Voxels holding values outside `label_values` simply belong to no scored label.
* Dice = 2|P∩R| / (|P| + |R|); IoU = |P∩R| / |P∪R|; accuracy = fraction of voxels where
  `(pred == l) == (ref == l)` (true positives + true negatives over all voxels).
* Both masks empty (label absent and correctly not predicted): Dice, IoU and HD95 are NaN,
  accuracy is 1. NaN is excluded from means, as nnU-Net does: a case cannot be scored on a
  structure it does not contain, and counting it as 1 would inflate the mean.
* Exactly one mask empty (a missed or a hallucinated structure): Dice = IoU = 0 and HD95 =
  the image diagonal in mm (the extent of the grid, `sqrt(sum((shape * spacing)^2))` over
  the axes longer than one voxel), an upper bound on any distance inside the image.
  MONAI returns NaN/inf here; a finite worst case keeps per-label means finite and still
  penalises the miss.
* HD95 follows medpy's `hd95`: surfaces are the mask voxels removed by one binary erosion
  with a face-connected (connectivity 1) structuring element, voxels on the image border
  count as surface; each surface voxel's distance to the other surface comes from
  `scipy.ndimage.distance_transform_edt(..., sampling=spacing)`; HD95 is the 95th
  percentile of both directed distance sets pooled together.
* Axes of length 1 are dropped before surface distances: a 2D image stored as (1, y, x)
  with nnU-Net's dummy slice spacing 999 is measured as the 2D image it is (otherwise the
  erosion would empty every mask through its two missing neighbour slices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "iou", "accuracy", "hd95")


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    label_values: Sequence[int],
    spacing: Sequence[float],
) -> dict[int, dict[str, float]]:
    """Metrics of one case: `{label_value: {"dice", "iou", "accuracy", "hd95"}}`.

    `pred` and `ref` are integer label maps of the same shape (label values, not class
    indices); `spacing` is in mm, one entry per axis of the arrays. NaN marks an undefined
    value (see the module docstring for the conventions).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {pred.ndim}D array")
    values = [int(v) for v in label_values]
    if len(set(values)) != len(values):
        raise ValueError(f"label values must be unique, got {values}")

    tp, fp, fn, n_voxels = _confusion_counts(pred, ref, values)
    # Drop length-1 axes once for all labels (see module docstring: 2D stored as (1, y, x)).
    keep = [axis for axis, size in enumerate(pred.shape) if size > 1]
    squeezed_shape = tuple(pred.shape[a] for a in keep)
    squeezed_spacing = tuple(float(spacing[a]) for a in keep)
    pred_s = pred.reshape(squeezed_shape)
    ref_s = ref.reshape(squeezed_shape)
    diagonal = image_diagonal_mm(squeezed_shape, squeezed_spacing)

    result: dict[int, dict[str, float]] = {}
    for i, value in enumerate(values):
        t, p_only, r_only = int(tp[i]), int(fp[i]), int(fn[i])
        n_pred, n_ref = t + p_only, t + r_only
        accuracy = (n_voxels - p_only - r_only) / n_voxels if n_voxels else math.nan
        if n_pred == 0 and n_ref == 0:
            dice = iou = hd = math.nan
        elif n_pred == 0 or n_ref == 0:
            dice = iou = 0.0
            hd = diagonal
        else:
            dice = 2.0 * t / (n_pred + n_ref)
            iou = t / (t + p_only + r_only)
            hd = _hd95_nonempty(pred_s == value, ref_s == value, squeezed_spacing)
        result[value] = {"dice": dice, "iou": iou, "accuracy": accuracy, "hd95": hd}
    return result


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm between two boolean masks, with the empty-mask conventions of this module."""
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
    keep = [axis for axis, size in enumerate(pred_mask.shape) if size > 1]
    shape = tuple(pred_mask.shape[a] for a in keep)
    sampling = tuple(float(spacing[a]) for a in keep)
    pred_mask = pred_mask.reshape(shape)
    ref_mask = ref_mask.reshape(shape)
    has_pred, has_ref = bool(pred_mask.any()), bool(ref_mask.any())
    if not has_pred and not has_ref:
        return math.nan
    if not has_pred or not has_ref:
        return image_diagonal_mm(shape, sampling)
    return _hd95_nonempty(pred_mask, ref_mask, sampling)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the grid's diagonal: the HD95 given when exactly one mask is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: those one face-connected erosion removes.

    `border_value=0` (scipy's default, as medpy) makes voxels on the array border surface.
    """
    if mask.ndim == 0:
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _hd95_nonempty(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 of two non-empty masks, computed on the bounding box of their union.

    Cropping is exact, not an approximation: every surface voxel lies in the box, the
    Euclidean distance between two voxels does not depend on what lies around them, and the
    box's outside is background in the full image as well, so erosion (border value 0)
    finds the same surfaces.
    """
    if pred_mask.ndim == 0:
        return 0.0
    box = _bounding_box(pred_mask | ref_mask)
    pred_mask = pred_mask[box]
    ref_mask = ref_mask[box]
    pred_surface = surface(pred_mask)
    ref_surface = surface(ref_mask)
    sampling = tuple(float(s) for s in spacing)
    # distance_transform_edt measures, for every non-zero voxel, the distance to the nearest
    # zero voxel: feed it the complement of a surface to get distances to that surface.
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(slices)


def _confusion_counts(
    pred: np.ndarray, ref: np.ndarray, values: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per label value: true positives, false positives, false negatives (one pass each).

    Values are mapped to indices 0..K-1 (K = "not a scored label") and a (K+1)^2 joint
    histogram is built with one bincount, instead of K passes of boolean masks.
    """
    k = len(values)
    order = np.argsort(values)
    sorted_values = np.asarray(values, dtype=np.int64)[order]

    def to_index(array: np.ndarray) -> np.ndarray:
        flat = array.reshape(-1).astype(np.int64, copy=False)
        pos = np.searchsorted(sorted_values, flat).clip(0, max(k - 1, 0))
        hit = sorted_values[pos] == flat if k else np.zeros(flat.shape, dtype=bool)
        # Map the sorted position back to the caller's order of label values.
        index = order[pos] if k else pos
        return np.where(hit, index, k)

    joint = np.bincount(to_index(pred) * (k + 1) + to_index(ref), minlength=(k + 1) ** 2)
    joint = joint.reshape(k + 1, k + 1)
    tp = np.diag(joint)[:k]
    fp = joint.sum(axis=1)[:k] - tp
    fn = joint.sum(axis=0)[:k] - tp
    return tp, fp, fn, int(pred.size)

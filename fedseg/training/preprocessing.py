"""Turn a loaded case into network input, and a prediction back into the case's geometry.

Order (nnU-Net v2): crop to the nonzero region -> normalise -> resample to the
configuration's spacing. Normalising before resampling keeps the nonzero mask and the image
aligned (resampling a mask and an image separately would let them drift apart at the
border). `properties` records every step so `revert_segmentation` can undo it exactly:
resample back to the cropped shape, then paste into the bounding box of the original image.

Segmentations are stored as class *indices* 0..K-1 (position in sorted label values), so a
dataset whose labels are {0, 2, 7} trains a 3-class network; -1 marks background outside the
nonzero region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit

from fedseg.data.case_loading import CaseData
from fedseg.data.cropping import OUTSIDE_NONZERO_LABEL, bbox_to_slices, crop_to_nonzero
from fedseg.data.normalization import normalize
from fedseg.data.resampling import (
    DEFAULT_ANISOTROPY_THRESHOLD,
    PROBABILITY_ORDER,
    compute_new_shape,
    resample_data,
)
from fedseg.planning.plans import ConfigurationPlan, Plans

# nnU-Net samples up to 10000 voxel positions per class for foreground oversampling: enough
# to cover a class's extent, small enough to store with every case.
MAX_CLASS_LOCATIONS = 10_000
# nnU-Net's fixed seed for that sampling, so preprocessing is reproducible.
CLASS_LOCATION_SEED = 1234


@dataclass
class PreprocessedCase:
    """A case ready for training or inference.

    data: (C, z, y, x) float32 on the configuration's grid.
    seg: (1, z, y, x) int16 class indices (-1 = background outside the nonzero region), or
        None for an unlabelled case.
    properties: JSON-able record of the geometry and every step (see `preprocess_case`).
    """

    case_id: str
    data: np.ndarray
    seg: np.ndarray | None
    properties: dict[str, Any] = field(default_factory=dict)


def label_values_to_indices(seg: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Map label values (as in dataset.json) to class indices 0..K-1; negatives stay as they are."""
    values = np.asarray(sorted(label_values))
    seg = np.asarray(seg)
    index = np.searchsorted(values, seg)
    valid = (seg >= 0)
    in_range = np.clip(index, 0, len(values) - 1)
    if np.any(valid & (values[in_range] != seg)):
        unknown = sorted(set(np.unique(seg[valid & (values[in_range] != seg)]).tolist()))
        raise ValueError(f"label value(s) {unknown} not among {list(values)}")
    return np.where(valid, in_range, seg).astype(np.int16)


def indices_to_label_values(seg: np.ndarray, plans: Plans | Sequence[int]) -> np.ndarray:
    """Map class indices 0..K-1 back to the label values of dataset.json (int16)."""
    label_values = plans.label_values if isinstance(plans, Plans) else plans
    values = np.asarray(sorted(label_values), dtype=np.int16)
    seg = np.asarray(seg)
    if seg.size and (seg.min() < 0 or seg.max() >= len(values)):
        raise ValueError(f"class indices must lie in 0..{len(values) - 1}, got {seg.min()}..{seg.max()}")
    return values[seg]


def target_spacing_3d(config: ConfigurationPlan, spacing: Sequence[float]) -> list[float]:
    """The configuration's spacing as (z, y, x); a 2D configuration keeps the case's own z."""
    if len(config.spacing) == 2:
        return [float(spacing[0]), *(float(s) for s in config.spacing)]
    if len(config.spacing) == 3:
        return [float(s) for s in config.spacing]
    raise ValueError(f"configuration {config.name!r} spacing must have 2 or 3 entries, got {config.spacing}")


def preprocess_case(case_data: CaseData, plans: Plans, config: ConfigurationPlan) -> PreprocessedCase:
    """Crop, normalise and resample one case as the plan says.

    properties: geometry (original, `Geometry.to_dict()`), spacing (original, z y x),
    shape_before_cropping, bbox ([[lo, hi), ...]), shape_after_cropping,
    spacing_after_cropping (= original spacing), target_spacing, shape_after_resampling,
    class_locations ({"1": [[z, y, x], ...], ...} per foreground class index, as strings so
    the dict survives JSON; empty for unlabelled cases).
    """
    spacing = [float(s) for s in case_data.geometry.spacing]
    data = case_data.data
    shape_before = [int(s) for s in data.shape[1:]]

    seg = None
    if case_data.seg is not None:
        seg = label_values_to_indices(case_data.seg, plans.label_values)
    data, cropped_seg, bbox = crop_to_nonzero(data, seg)
    shape_after_cropping = [int(s) for s in data.shape[1:]]

    data = normalize(
        data,
        cropped_seg,
        config.normalization_schemes,
        config.use_mask_for_norm,
        plans.fingerprint.get("foreground_intensity_properties_per_channel"),
    )

    target = target_spacing_3d(config, spacing)
    new_shape = compute_new_shape(shape_after_cropping, spacing, target)
    threshold = config.resampling_separate_z_anisotropy_threshold
    data = resample_data(data, new_shape, False, spacing, target, threshold)

    out_seg = None
    class_locations: dict[str, list[list[int]]] = {}
    if seg is not None:
        resampled = resample_data(cropped_seg[None], new_shape, True, spacing, target, threshold)
        out_seg = resampled.astype(np.int16)
        # Per foreground label value (also with regions: every region is a union of them).
        class_locations = sample_class_locations(out_seg[0], range(1, len(plans.label_values)))

    properties = {
        "geometry": case_data.geometry.to_dict(),
        "spacing": spacing,
        "shape_before_cropping": shape_before,
        "bbox": bbox,
        "shape_after_cropping": shape_after_cropping,
        "spacing_after_cropping": spacing,
        "target_spacing": target,
        "shape_after_resampling": [int(s) for s in new_shape],
        "class_locations": class_locations,
    }
    return PreprocessedCase(case_data.case_id, data.astype(np.float32, copy=False), out_seg, properties)


def argmax_int16(probs: np.ndarray) -> np.ndarray:
    """argmax over axis 0 as int16, one slice at a time: numpy's argmax returns int64, which
    over a whole volume would be twice the size of a float32 image."""
    out = np.empty(probs.shape[1:], dtype=np.int16)
    for z in range(probs.shape[1]):
        out[z] = np.argmax(probs[:, z], axis=0)
    return out


def sample_class_locations(
    seg: np.ndarray, classes: Sequence[int] | range, max_samples: int = MAX_CLASS_LOCATIONS,
    seed: int = CLASS_LOCATION_SEED,
) -> dict[str, list[list[int]]]:
    """Up to `max_samples` random (z, y, x) voxel positions per class (deterministic).

    The training loader centres "foreground" patches on these, so rare classes are seen.
    A class absent from the case gets an empty list.
    """
    rng = np.random.default_rng(seed)
    locations: dict[str, list[list[int]]] = {}
    for c in classes:
        coords = np.argwhere(seg == c)
        if len(coords) > max_samples:
            coords = coords[np.sort(rng.choice(len(coords), max_samples, replace=False))]
        locations[str(int(c))] = coords.astype(int).tolist()
    return locations


def revert_probabilities(
    probs: np.ndarray, properties: dict[str, Any], config: ConfigurationPlan, regions: bool = False,
) -> np.ndarray:
    """(K, z, y, x) class probabilities on the preprocessed grid -> (K, Z, Y, X) float32 in the
    case's original geometry (`shape_before_cropping`), resampled linearly as nnU-Net's export
    does; outside the cropping box the background has probability 1 (`regions`: the channels
    are per-region sigmoids, and outside the box no region is present: all 0).

    Probabilities of several models (folds, configurations) averaged in this geometry are an
    ensemble, whatever grid each model predicted on.
    """
    return _uncrop_probabilities(_resample_to_cropped_grid(probs, properties, config), properties, regions)


def revert_logits(
    logits: np.ndarray, properties: dict[str, Any], config: ConfigurationPlan, regions: bool = False,
) -> np.ndarray:
    """(K, z, y, x) network outputs on the preprocessed grid -> (K, Z, Y, X) float32
    probabilities in the case's original geometry, in nnU-Net's order: the logits are
    resampled (linearly), then turned into probabilities (softmax over classes, or a sigmoid
    per region with `regions`); outside the cropping box the background has probability 1
    (regions: no region present)."""
    resampled = _resample_to_cropped_grid(logits, properties, config)
    if regions:
        probs = expit(resampled)   # the logistic function without overflow warnings
    else:   # a stable softmax: exp of the difference to the largest logit
        probs = np.exp(resampled - resampled.max(axis=0, keepdims=True))
        probs /= probs.sum(axis=0, keepdims=True)
    return _uncrop_probabilities(probs, properties, regions)


def _resample_to_cropped_grid(values: np.ndarray, properties: dict[str, Any], config: ConfigurationPlan) -> np.ndarray:
    """(K, z, y, x) float values on the preprocessed grid, resampled linearly to the cropped box
    at the case's own spacing (`shape_after_cropping`)."""
    spacing = [float(s) for s in properties["spacing_after_cropping"]]
    current = target_spacing_3d(config, spacing)
    shape_after_cropping = tuple(int(s) for s in properties["shape_after_cropping"])
    threshold = getattr(config, "resampling_separate_z_anisotropy_threshold", DEFAULT_ANISOTROPY_THRESHOLD)
    return resample_data(
        np.asarray(values).astype(np.float32, copy=False), shape_after_cropping, False, current, spacing, threshold,
        order=PROBABILITY_ORDER,
    )


def _uncrop_probabilities(probs: np.ndarray, properties: dict[str, Any], regions: bool) -> np.ndarray:
    """Probabilities of the cropped box placed into the full image: outside it the background
    has probability 1 (regions: every region 0)."""
    full = np.zeros((probs.shape[0], *(int(s) for s in properties["shape_before_cropping"])), dtype=np.float32)
    if not regions:
        full[0] = 1.0
    full[(slice(None), *bbox_to_slices(properties["bbox"]))] = probs
    return full


def revert_segmentation(seg_or_probs: np.ndarray, properties: dict[str, Any], config: ConfigurationPlan) -> np.ndarray:
    """Bring a prediction on the preprocessed grid back to the case's original geometry.

    Accepts (K, z, y, x) class scores, logits or probabilities (resampled linearly, then
    argmax, as nnU-Net's export does with logits) or a (z, y, x) class-index map (resampled
    through one-hot masks).
    Returns (z, y, x) int16 class indices of shape `shape_before_cropping`; outside the
    cropping box everything is background (0). (Region-based predictions go through
    `revert_logits` and `fedseg.data.labels.paint_regions`.)
    """
    arr = np.asarray(seg_or_probs)
    if arr.ndim == 4:
        return argmax_int16(revert_probabilities(arr, properties, config))
    if arr.ndim != 3:
        raise ValueError(f"expected (K, z, y, x) probabilities or a (z, y, x) index map, got shape {arr.shape}")
    spacing = [float(s) for s in properties["spacing_after_cropping"]]
    current = target_spacing_3d(config, spacing)
    shape_after_cropping = tuple(int(s) for s in properties["shape_after_cropping"])
    threshold = getattr(config, "resampling_separate_z_anisotropy_threshold", DEFAULT_ANISOTROPY_THRESHOLD)
    indices = resample_data(arr.astype(np.int16)[None], shape_after_cropping, True, current, spacing, threshold)[0]
    indices = np.maximum(indices, 0)  # an index map may carry -1 (outside); that is background
    full = np.zeros(tuple(int(s) for s in properties["shape_before_cropping"]), dtype=np.int16)
    full[bbox_to_slices(properties["bbox"])] = indices
    return full


__all__ = [
    "OUTSIDE_NONZERO_LABEL",
    "PreprocessedCase",
    "indices_to_label_values",
    "label_values_to_indices",
    "preprocess_case",
    "revert_logits",
    "revert_probabilities",
    "revert_segmentation",
    "sample_class_locations",
    "target_spacing_3d",
]

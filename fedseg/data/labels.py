"""dataset.json's labels: plain labels, or nnU-Net's region-based labels (BraTS style).

Plain: `{"background": 0, "liver": 1, "tumour": 2}`, one softmax output per label value.

Regions (nnU-Net v2): a label may name a list of label values, a region that overlaps
others, e.g. BraTS's
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3]
The label maps on disk still hold the plain values (0..3). The network has one sigmoid
output per foreground region, trained with binary cross-entropy + soft Dice on the region
masks (`np.isin(seg, region)`); a prediction paints, for each region i in turn, the label
value `regions_class_order[i]` where its sigmoid exceeds 0.5 (later regions overwrite
earlier ones, so nested regions are painted from the largest to the smallest), and
evaluation scores each region's mask. As nnU-Net, a dataset has regions when any label is
a list of more than one value, and then `regions_class_order` is required, one label value
per foreground region.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.errors import InputError

# nnU-Net's decision threshold on a region's sigmoid.
REGION_THRESHOLD = 0.5


@dataclass(frozen=True)
class LabelLayout:
    """The labels of a dataset and how a network predicts them."""

    labels: dict[str, int | tuple[int, ...]]     # as dataset.json, lists as tuples
    regions_class_order: tuple[int, ...] | None  # None: plain labels

    @property
    def has_regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def label_values(self) -> list[int]:
        """Every label value a label map may hold (0 included), sorted."""
        values: set[int] = set()
        for value in self.labels.values():
            values.update(value if isinstance(value, tuple) else (value,))
        return sorted(values)

    @property
    def foreground_regions(self) -> list[tuple[int, ...]]:
        """The regions in dataset.json order, background left out (one network output each)."""
        return [_as_tuple(v) for v in self.labels.values() if _as_tuple(v) != (0,)]

    @property
    def n_outputs(self) -> int:
        """Network output channels: one per label value, or one per foreground region."""
        return len(self.foreground_regions) if self.has_regions else len(self.label_values)

    def region_class_indices(self) -> list[list[int]]:
        """Per foreground region, the class indices (positions in `label_values`) it covers."""
        position = {v: i for i, v in enumerate(self.label_values)}
        return [[position[v] for v in region] for region in self.foreground_regions]

    def paint_class_indices(self) -> list[int]:
        """Per foreground region, the class index of the value it is painted with."""
        position = {v: i for i, v in enumerate(self.label_values)}
        return [position[v] for v in self.regions_class_order or ()]

    def scored(self) -> list[tuple[str, tuple[int, ...]]]:
        """What evaluation scores: (name, label values of its mask) per label or region."""
        return [(name, _as_tuple(value)) for name, value in self.labels.items()]


def _as_tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)


def parse_labels(labels: Any, regions_class_order: Any = None, source: str | Path | None = None) -> LabelLayout:
    """Validate dataset.json's `labels` (and `regions_class_order`); InputError naming `source`."""
    if not isinstance(labels, Mapping) or not labels:
        raise InputError('labels must be a non-empty object {"background": 0, ...}', source)
    parsed: dict[str, int | tuple[int, ...]] = {}
    for name, value in labels.items():
        if _is_int(value):
            parsed[str(name)] = int(value)
        elif isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
            members = tuple(int(v) for v in value)
            if len(set(members)) != len(members):
                raise InputError(f"region {name!r} names a label value twice", source)
            parsed[str(name)] = members
        else:
            raise InputError(f"label {name!r} must be an integer or a non-empty list of integers (a region)", source)
    values = [v for value in parsed.values() for v in _as_tuple(value)]
    if any(v < 0 for v in values):
        raise InputError("label values must be non-negative integers", source)
    if 0 not in parsed.values():
        raise InputError("labels must include background = 0", source)
    if any(0 in value for value in parsed.values() if isinstance(value, tuple)):
        raise InputError("a region must not include background (0)", source)
    # nnU-Net's rule: regions when a label lists more than one value ([3] alone is label 3).
    has_regions = any(isinstance(value, tuple) and len(value) > 1 for value in parsed.values())
    if not has_regions:
        parsed = {name: _as_tuple(value)[0] for name, value in parsed.items()}
        if len(set(values)) != len(values):
            raise InputError("label values must be unique", source)
        if regions_class_order is not None:
            raise InputError("regions_class_order is given but no label is a region (a list of values)", source)
        return LabelLayout(parsed, None)
    layout_regions = [_as_tuple(v) for v in parsed.values() if v != 0]
    if len(set(layout_regions)) != len(layout_regions):
        raise InputError("two labels name the same region", source)
    if (
        not isinstance(regions_class_order, (list, tuple))
        or len(regions_class_order) != len(layout_regions)
        or not all(_is_int(v) and v > 0 for v in regions_class_order)
    ):
        raise InputError(
            f"region-based labels need regions_class_order: one positive label value per foreground region "
            f"({len(layout_regions)}), the value each region is painted with, in painting order",
            source,
        )
    return LabelLayout(parsed, tuple(int(v) for v in regions_class_order))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def layout_to_json(layout: LabelLayout) -> dict[str, int | list[int]]:
    """dataset.json's spelling of the labels (regions as lists)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in layout.labels.items()}


def paint_regions(probabilities: np.ndarray, regions_class_order: Sequence[int]) -> np.ndarray:
    """(R, ...) region sigmoids -> label values (nnU-Net's convert_probabilities_to_segmentation)."""
    seg = np.zeros(probabilities.shape[1:], dtype=np.int16)
    for i, value in enumerate(regions_class_order):
        seg[probabilities[i] > REGION_THRESHOLD] = value
    return seg

"""Region-based labels: parsing dataset.json, painting predictions, the Dice + BCE region loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.data.labels import paint_regions, parse_labels
from fedseg.errors import InputError
from fedseg.training.losses import DiceBCERegionLoss, make_loss

BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def test_brats_layout() -> None:
    layout = parse_labels(BRATS, [1, 2, 3])
    assert layout.has_regions and layout.n_outputs == 3
    assert layout.label_values == [0, 1, 2, 3]
    assert layout.foreground_regions == [(1, 2, 3), (2, 3), (3,)]
    assert layout.region_class_indices() == [[1, 2, 3], [2, 3], [3]]


def test_plain_labels_have_no_regions() -> None:
    layout = parse_labels({"background": 0, "a": 2, "b": 7})
    assert not layout.has_regions and layout.n_outputs == 3 and layout.label_values == [0, 2, 7]


@pytest.mark.parametrize(
    ("labels", "order", "match"),
    [
        (BRATS, None, "regions_class_order"),
        (BRATS, [1, 2], "regions_class_order"),
        ({"background": 0, "a": 1}, [1], "no label is a region"),
        ({"background": 0, "a": [0, 1]}, [1], "background"),
        ({"background": 0, "a": "x"}, None, "integer or a non-empty list"),
        ({"a": 1}, None, "background = 0"),
    ],
)
def test_bad_labels_are_refused(labels, order, match) -> None:
    with pytest.raises(InputError, match=match):
        parse_labels(labels, order)


def test_paint_regions_follows_regions_class_order() -> None:
    probs = np.zeros((3, 1, 1, 4), dtype=np.float32)
    probs[0, ..., 1:] = 0.9    # whole tumour on voxels 1-3
    probs[1, ..., 2:] = 0.9    # core on 2-3
    probs[2, ..., 3] = 0.9     # enhancing on 3
    probs[2, ..., 0] = 0.5     # exactly 0.5 is not above the threshold
    assert paint_regions(probs, [1, 2, 3]).ravel().tolist() == [0, 1, 2, 3]


def test_region_loss_is_low_for_the_right_regions_and_high_for_wrong_ones() -> None:
    target = torch.tensor([0, 1, 2, 3] * 4).reshape(1, 1, 4, 4)
    loss = DiceBCERegionLoss([[1, 2, 3], [2, 3], [3]])
    regions = loss.region_targets(target)
    assert regions.shape == (1, 3, 4, 4)
    assert regions[0, 1].flatten().tolist() == [0.0, 0.0, 1.0, 1.0] * 4
    right = (regions * 2 - 1) * 20
    assert loss(right, target).item() < -0.99   # BCE ~ 0, Dice ~ 1
    assert loss(-right, target).item() > 10
    with pytest.raises(InputError, match="region-based"):
        make_loss("dice_focal", None, [[1]])

"""crop_to_nonzero: nnU-Net's nonzero cropping, bbox bookkeeping and the -1 outside marker."""

from __future__ import annotations

import numpy as np

from fedseg.data.cropping import OUTSIDE_NONZERO_LABEL, bbox_to_slices, crop_to_nonzero


def _framed_case() -> tuple[np.ndarray, np.ndarray]:
    data = np.zeros((2, 16, 18, 20), dtype=np.float32)
    data[0, 3:12, 4:15, 5:17] = 5.0          # channel 0 region
    data[1, 2:5, 4:6, 5:7] = -1.0            # channel 1 widens the box in z
    data[0, 6:8, 8:10, 9:11] = 0.0           # an enclosed hole: still inside
    seg = np.zeros((16, 18, 20), dtype=np.int16)
    seg[6:9, 8:11, 9:12] = 2
    return data, seg


def test_bbox_is_union_of_channels_and_half_open() -> None:
    data, seg = _framed_case()
    cropped, cropped_seg, bbox = crop_to_nonzero(data, seg)
    assert bbox == [[2, 12], [4, 15], [5, 17]]
    assert cropped.shape == (2, 10, 11, 12)
    assert cropped_seg.shape == (10, 11, 12)
    np.testing.assert_array_equal(cropped, data[(slice(None), *bbox_to_slices(bbox))])


def test_outside_background_is_minus_one_and_holes_count_as_inside() -> None:
    data, seg = _framed_case()
    _, cropped_seg, bbox = crop_to_nonzero(data, seg)
    full = np.full(seg.shape, 99, dtype=np.int16)
    full[bbox_to_slices(bbox)] = cropped_seg
    # The filled hole (channel 0 zero, enclosed) is inside: label 0 or 2, never -1.
    assert (full[6:8, 8:10, 9:11] >= 0).all()
    # Foreground labels are kept even where they are outside the nonzero mask.
    assert (full[6:9, 8:11, 9:12] == 2).sum() >= 1
    # Slice z=2 is in the box only through channel 1's small patch; the rest of it is outside.
    assert full[2, 10, 10] == OUTSIDE_NONZERO_LABEL
    assert full[2, 4, 5] == 0
    assert cropped_seg.dtype == np.int16
    # Input untouched.
    assert seg.min() == 0


def test_seg_none_gives_inside_outside_map() -> None:
    data, _ = _framed_case()
    _, seg, _ = crop_to_nonzero(data, None)
    assert set(np.unique(seg).tolist()) == {-1, 0}


def test_all_zero_image_keeps_full_extent() -> None:
    data = np.zeros((1, 4, 5, 6), dtype=np.float32)
    cropped, seg, bbox = crop_to_nonzero(data, np.zeros((4, 5, 6), dtype=np.int16))
    assert bbox == [[0, 4], [0, 5], [0, 6]]
    assert cropped.shape == data.shape
    assert (seg == 0).all()

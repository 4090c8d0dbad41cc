"""Resampling follows nnU-Net: shapes, interpolation orders, one-hot labels, separate z."""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage.transform import resize

from fedseg.data.resampling import compute_new_shape, resample_data, separate_z_axis


def test_compute_new_shape_rounds_physical_extent() -> None:
    assert compute_new_shape((20, 30, 30), (2.0, 1.0, 1.0), (1.0, 1.5, 1.5)) == (40, 20, 20)
    assert compute_new_shape((10, 10, 10), (1.0, 1.0, 1.0), (3.0, 3.0, 3.0)) == (3, 3, 3)  # 3.33 -> 3
    assert compute_new_shape((1, 64, 64), (999.0, 1.0, 1.0), (999.0, 0.5, 0.5)) == (1, 128, 128)


def test_separate_z_decision() -> None:
    assert separate_z_axis((1, 1, 1), (1.2, 1, 1)) is None
    assert separate_z_axis((5, 0.8, 0.8), (1, 1, 1)) == 0          # current spacing decides first
    assert separate_z_axis((1, 1, 1), (1, 4, 0.9)) == 1             # then the target spacing
    assert separate_z_axis((4, 4, 1), (1, 1, 1)) is None            # no single low-res axis
    assert separate_z_axis((999, 1, 1), (999, 0.5, 0.5)) == 0       # 2D images


def test_image_matches_skimage_resize_order3() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 12, 14, 16)).astype(np.float32)
    out = resample_data(image, (17, 9, 20), False, (1, 1, 1), (0.7, 1.5, 0.8))
    expected = resize(image[0].astype(np.float64), (17, 9, 20), order=3, mode="edge", anti_aliasing=False)
    assert out.dtype == np.float32 and out.shape == (1, 17, 9, 20)
    np.testing.assert_allclose(out[0], expected, atol=1e-4)


def test_same_shape_is_a_copy() -> None:
    data = np.ones((2, 4, 4, 4), dtype=np.float32)
    out = resample_data(data, (4, 4, 4), False, (1, 1, 1), (1, 1, 1))
    out[:] = 5
    assert data.max() == 1


def test_segmentation_keeps_label_set_and_shape() -> None:
    seg = np.zeros((1, 16, 16, 16), dtype=np.int16)
    seg[0, 4:12, 4:12, 4:12] = 1
    seg[0, 6:10, 6:10, 6:10] = 3          # labels need not be contiguous
    seg[0, :2] = -1                       # outside-nonzero marker survives
    out = resample_data(seg, (24, 10, 16), True, (1, 1, 1), (0.667, 1.6, 1))
    assert out.dtype == np.int16
    assert set(np.unique(out).tolist()) == {-1, 0, 1, 3}
    # Volume of each structure is preserved approximately (physical size does not change).
    for label in (1, 3):
        before = (seg == label).sum() * 1.0
        after = (out == label).sum() * 0.667 * 1.6
        assert after == pytest.approx(before, rel=0.2)


def test_downsample_then_upsample_binary_seg_round_trip() -> None:
    zz, yy, xx = np.mgrid[:24, :24, :24]
    ball = (((zz - 12) ** 2 + (yy - 11) ** 2 + (xx - 12) ** 2) < 49).astype(np.int16)[None]
    down = resample_data(ball, (12, 24, 24), True, (1, 1, 1), (2, 1, 1))
    up = resample_data(down, (24, 24, 24), True, (2, 1, 1), (1, 1, 1))
    dice = 2 * (up & ball).sum() / (up.sum() + ball.sum())
    assert dice > 0.9


def test_anisotropic_uses_nearest_along_z() -> None:
    # Slices at 5 mm: the values along z must be copies of existing slices, never blends.
    rng = np.random.default_rng(1)
    slices = rng.uniform(0, 100, size=(6, 1, 1)).astype(np.float32)
    data = np.broadcast_to(slices, (6, 8, 8))[None].copy()
    out = resample_data(data, (15, 12, 12), False, (5.0, 1.0, 1.0), (2.0, 0.667, 0.667))
    assert out.shape == (1, 15, 12, 12)
    for z in range(15):
        assert np.min(np.abs(slices[:, 0, 0] - out[0, z, 6, 6])) < 1e-3


def test_resampling_128_cube_is_fast() -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(size=(1, 96, 96, 96)).astype(np.float32)
    seg = (data > 1).astype(np.int16)
    start = time.perf_counter()
    resample_data(data, (110, 80, 96), False, (1, 1, 1), (0.87, 1.2, 1.0))
    resample_data(seg, (110, 80, 96), True, (1, 1, 1), (0.87, 1.2, 1.0))
    assert time.perf_counter() - start < 5.0

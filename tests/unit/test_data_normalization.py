"""Normalisation schemes match nnU-Net's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.data.normalization import normalize

PROPS = {"0": {"mean": 50.0, "std": 10.0, "percentile_00_5": 0.0, "percentile_99_5": 100.0,
               "median": 50.0, "min": -1000.0, "max": 3000.0}}


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 30, size=(1, 6, 7, 8)).astype(np.float32)


def test_ct_clips_to_fingerprint_percentiles_then_zscores() -> None:
    data = _image()
    out = normalize(data, None, ["CTNormalization"], [False], PROPS)
    expected = (np.clip(data, 0.0, 100.0) - 50.0) / 10.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32


def test_ct_needs_intensity_properties() -> None:
    with pytest.raises(ValueError, match="intensity properties"):
        normalize(_image(), None, ["CTNormalization"], [False], None)


def test_zscore_whole_image() -> None:
    out = normalize(_image(), None, ["ZScoreNormalization"], [False], None)
    assert out.mean() == pytest.approx(0.0, abs=1e-5)
    assert out.std() == pytest.approx(1.0, abs=1e-4)


def test_zscore_within_mask_sets_outside_to_zero() -> None:
    data = _image() + 100
    seg = np.full(data.shape[1:], -1, dtype=np.int16)
    seg[1:5, 2:6, 2:7] = 0
    seg[2:3, 3:4, 3:4] = 1
    out = normalize(data, seg[None], ["ZScoreNormalization"], [True], None)
    inside = seg >= 0
    assert out[0][inside].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[0][inside].std() == pytest.approx(1.0, abs=1e-4)
    assert (out[0][~inside] == 0).all()


def test_zscore_constant_image_is_finite() -> None:
    out = normalize(np.full((1, 3, 3, 3), 7.0, np.float32), None, ["ZScoreNormalization"], [False], None)
    assert np.isfinite(out).all() and (out == 0).all()


def test_rescale_and_none_per_channel() -> None:
    data = np.concatenate([_image(1), _image(2)])
    out = normalize(data, None, ["RescaleTo01Normalization", "NoNormalization"], [False, False], None)
    assert out[0].min() == pytest.approx(0.0) and out[0].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(out[1], data[1])
    assert data[0].min() < 0  # input untouched


def test_unknown_scheme_and_count_mismatch() -> None:
    with pytest.raises(ValueError, match="unknown normalisation scheme"):
        normalize(_image(), None, ["Bogus"], [False], None)
    with pytest.raises(ValueError, match="channels"):
        normalize(_image(), None, ["ZScoreNormalization", "NoNormalization"], [False, False], None)

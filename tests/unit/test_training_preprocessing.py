"""preprocess_case / revert_segmentation: crop, normalise, resample, and exactly back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.data.case_loading import CaseData
from fedseg.data.image_io import Geometry
from fedseg.training.preprocessing import (
    indices_to_label_values,
    label_values_to_indices,
    preprocess_case,
    revert_segmentation,
)
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec

LABELS = {"background": 0, "liver": 2, "tumour": 5}     # non-contiguous on purpose


def _config(spacing: list[float], name: str = "3d_fullres") -> ConfigurationPlan:
    ndim = len(spacing)
    network = NetworkSpec(2, [8, 16], [[3] * ndim] * 2, [[1] * ndim, [2] * ndim], [1, 1], [1])
    return ConfigurationPlan(name, spacing, [16] * ndim, [16.0] * ndim, 2, ["ZScoreNormalization"], [True], network)


def _plans(config: ConfigurationPlan) -> Plans:
    return Plans(
        dataset_name="test", channel_names={"0": "MRI"}, labels=LABELS, file_ending=".nii.gz",
        fingerprint={}, sites={"a": SiteInfo("MRI", ["MRI"], 1)}, strategy=StrategySpec("fedavg"),
        configurations={config.name: config}, default_configuration=config.name,
    )


def _case(spacing: tuple[float, float, float] = (2.0, 0.8, 0.8)) -> CaseData:
    """A body (nonzero) inside a zero frame, with a liver blob and a tumour inside it."""
    shape = (14, 30, 28)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    rng = np.random.default_rng(3)
    body = (zz >= 2) & (zz < 12) & (yy >= 4) & (yy < 26) & (xx >= 3) & (xx < 25)
    liver = ((zz - 7) ** 2 / 9 + (yy - 15) ** 2 / 36 + (xx - 13) ** 2 / 36) < 1
    tumour = ((zz - 7) ** 2 / 4 + (yy - 15) ** 2 / 9 + (xx - 15) ** 2 / 9) < 1
    seg = np.where(tumour, 5, np.where(liver, 2, 0)).astype(np.int16)
    data = np.where(body, 100 + 50 * liver + 50 * tumour + rng.normal(0, 5, shape), 0).astype(np.float32)
    geometry = Geometry(shape, spacing, (1.0, 2.0, 3.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), False)
    return CaseData("case_000", data[None], seg, geometry)


def test_label_index_mapping_round_trip() -> None:
    seg = np.array([[0, 2], [5, -1]], dtype=np.int16)
    idx = label_values_to_indices(seg, list(LABELS.values()))
    np.testing.assert_array_equal(idx, [[0, 1], [2, -1]])
    np.testing.assert_array_equal(indices_to_label_values(np.maximum(idx, 0), _plans(_config([1, 1, 1]))), [[0, 2], [5, 0]])
    with pytest.raises(ValueError, match="not among"):
        label_values_to_indices(np.array([3]), [0, 2, 5])


def test_preprocess_records_properties_and_class_indices() -> None:
    config = _config([1.0, 1.0, 1.0])
    case = _case()
    pre = preprocess_case(case, _plans(config), config)
    props = pre.properties
    assert props["shape_before_cropping"] == [14, 30, 28]
    assert props["bbox"] == [[2, 12], [4, 26], [3, 25]]
    assert props["shape_after_cropping"] == [10, 22, 22]
    assert props["shape_after_resampling"] == [20, 18, 18]        # 10*2/1, round(22*0.8)
    assert pre.data.shape == (1, 20, 18, 18) and pre.data.dtype == np.float32
    assert pre.seg.shape == (1, 20, 18, 18) and pre.seg.dtype == np.int16
    assert set(np.unique(pre.seg).tolist()) <= {-1, 0, 1, 2}
    assert {1, 2} <= set(np.unique(pre.seg).tolist())
    # class_locations: string keys per foreground class index, (z, y, x) of that class.
    locs = props["class_locations"]
    assert sorted(locs) == ["1", "2"]
    for key, coords in locs.items():
        coords = np.asarray(coords)
        assert coords.shape[1] == 3 and len(coords) > 0
        assert (pre.seg[0][tuple(coords.T)] == int(key)).all()
    json.dumps(props)  # JSON-able, so the trainer can cache it
    # Deterministic.
    again = preprocess_case(case, _plans(config), config)
    assert again.properties == props
    np.testing.assert_array_equal(again.data, pre.data)


def test_round_trip_restores_geometry_and_labels() -> None:
    config = _config([1.0, 1.0, 1.0])
    plans = _plans(config)
    case = _case()
    pre = preprocess_case(case, plans, config)
    # A perfect "network": one-hot probabilities of the preprocessed seg (outside -> background).
    idx = np.maximum(pre.seg[0], 0)
    probs = np.stack([(idx == k).astype(np.float32) for k in range(plans.n_classes)])
    for prediction in (probs, idx):
        back = revert_segmentation(prediction, pre.properties, config)
        assert back.shape == case.seg.shape
        labels = indices_to_label_values(back, plans)
        for value in (2, 5):
            ref, got = case.seg == value, labels == value
            dice = 2 * (ref & got).sum() / (ref.sum() + got.sum())
            assert dice > 0.85, (value, dice)
        assert (labels[case.data[0] == 0] == 0).all()   # outside the body: background


def test_unlabelled_case_and_2d_configuration() -> None:
    config = _config([0.4, 0.4], name="2d")
    case = _case()
    case = CaseData(case.case_id, case.data, None, case.geometry)
    pre = preprocess_case(case, _plans(config), config)
    assert pre.seg is None and pre.properties["class_locations"] == {}
    # z keeps its own spacing and size; only y, x are resampled (0.8 -> 0.4 doubles them).
    assert pre.properties["target_spacing"] == [2.0, 0.4, 0.4]
    assert pre.data.shape == (1, 10, 44, 44)
    back = revert_segmentation(np.zeros((3, 10, 44, 44), np.float32), pre.properties, config)
    assert back.shape == (14, 30, 28)


def test_round_trip_is_exact_when_spacing_already_matches() -> None:
    config = _config([2.0, 0.8, 0.8])
    plans = _plans(config)
    case = _case()
    pre = preprocess_case(case, plans, config)
    assert pre.data.shape[1:] == tuple(pre.properties["shape_after_cropping"])
    back = indices_to_label_values(revert_segmentation(pre.seg[0], pre.properties, config), plans)
    np.testing.assert_array_equal(back, case.seg)

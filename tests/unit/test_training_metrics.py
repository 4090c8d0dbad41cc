"""Metrics against hand-computed cases and a plain brute-force reference implementation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedseg.training.metrics import case_metrics, hd95, image_diagonal_mm


# -- a plain reference implementation (no scipy.ndimage), for tiny inputs -----------------

def brute_surface(mask: np.ndarray) -> np.ndarray:
    """A voxel is surface if it is in the mask and one of its face neighbours is not
    (outside the array counts as not in the mask)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_neighbours_in = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            index = list(inner)
            index[axis] = slice(1 + shift, padded.shape[axis] - 1 + shift)
            all_neighbours_in &= padded[tuple(index)]
    return mask & ~all_neighbours_in


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing, dtype=float)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing, dtype=float)
    pairwise = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)]), 95))


# -- analytic cases -----------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 1, 3, 5])
def test_offset_cubes_dice_and_iou_are_analytic(offset):
    side = 8
    pred = np.zeros((20, 20, 24), np.int16)
    ref = np.zeros_like(pred)
    ref[4:4 + side, 4:4 + side, 4:4 + side] = 1
    pred[4:4 + side, 4:4 + side, 4 + offset:4 + offset + side] = 1
    m = case_metrics(pred, ref, [0, 1], (1.0, 1.0, 1.0))[1]
    assert m["dice"] == pytest.approx((side - offset) / side)
    assert m["iou"] == pytest.approx((side - offset) / (side + offset))
    # Disagreeing voxels: the two non-overlapping slabs of side*side*offset each.
    assert m["accuracy"] == pytest.approx(1 - 2 * side * side * offset / pred.size)
    if offset == 0:
        assert m["hd95"] == 0.0


@pytest.mark.parametrize(
    "spacing, axis, gap",
    [((1.0, 1.0, 1.0), 0, 4), ((2.5, 0.8, 0.8), 0, 3), ((2.5, 0.8, 0.7), 2, 5), ((1.0, 3.0, 1.0), 1, 2)],
)
def test_hd95_of_parallel_planes_is_their_distance_in_mm(spacing, axis, gap):
    shape = (12, 14, 16)
    pred = np.zeros(shape, np.int16)
    ref = np.zeros(shape, np.int16)
    first = [slice(None)] * 3
    second = [slice(None)] * 3
    first[axis] = 2
    second[axis] = 2 + gap
    ref[tuple(first)] = 1
    pred[tuple(second)] = 1
    # Every voxel of each one-voxel-thick plane is surface, and its nearest point on the
    # other plane lies straight across: gap voxels times the spacing of that axis.
    assert case_metrics(pred, ref, [1], spacing)[1]["hd95"] == pytest.approx(gap * spacing[axis])


def test_hd95_of_concentric_spheres_is_the_radius_difference():
    grid = np.indices((41, 41, 41)) - 20
    radius = np.sqrt((grid**2).sum(0))
    ref = radius <= 15
    pred = radius <= 10
    # The discretised spheres' surfaces sit within a voxel of the ideal radius.
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(5.0, abs=1.0)
    # Scaling every spacing scales every distance.
    assert hd95(pred, ref, (2.0, 2.0, 2.0)) == pytest.approx(2 * hd95(pred, ref, (1.0, 1.0, 1.0)))


def test_anisotropic_spacing_is_applied_per_axis():
    ref = np.zeros((10, 10, 10), bool)
    pred = np.zeros_like(ref)
    ref[2, 2, 2] = True
    pred[5, 2, 2] = True  # 3 voxels apart along z only
    assert hd95(pred, ref, (4.0, 1.0, 1.0)) == pytest.approx(12.0)
    assert hd95(pred, ref, (1.0, 4.0, 4.0)) == pytest.approx(3.0)


# -- empty-mask conventions ---------------------------------------------------------------

def test_both_empty_is_nan_and_accuracy_one():
    pred = np.zeros((6, 7, 8), np.int16)
    ref = np.zeros_like(pred)
    m = case_metrics(pred, ref, [0, 1], (1.0, 2.0, 3.0))
    assert math.isnan(m[1]["dice"]) and math.isnan(m[1]["iou"]) and math.isnan(m[1]["hd95"])
    assert m[1]["accuracy"] == 1.0
    assert m[0] == {"dice": 1.0, "iou": 1.0, "accuracy": 1.0, "hd95": 0.0}


@pytest.mark.parametrize("missing", ["pred", "ref"])
def test_one_empty_gives_zero_overlap_and_the_image_diagonal(missing):
    shape, spacing = (6, 7, 8), (1.0, 2.0, 3.0)
    full = np.zeros(shape, np.int16)
    full[2:4, 2:4, 2:4] = 1
    empty = np.zeros(shape, np.int16)
    pred, ref = (empty, full) if missing == "pred" else (full, empty)
    m = case_metrics(pred, ref, [1], spacing)[1]
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert m["hd95"] == pytest.approx(math.sqrt(6**2 + 14**2 + 24**2))
    assert m["hd95"] == pytest.approx(image_diagonal_mm(shape, spacing))
    assert m["accuracy"] == pytest.approx(1 - 8 / full.size)


def test_2d_image_with_dummy_slice_spacing_is_measured_in_plane():
    ref = np.zeros((1, 12, 12), np.int16)
    pred = np.zeros_like(ref)
    ref[0, 2:8, 2:8] = 1
    pred[0, 4:10, 3:9] = 1
    spacing = (999.0, 0.5, 0.5)
    got = case_metrics(pred, ref, [1], spacing)[1]["hd95"]
    assert got == pytest.approx(brute_hd95(pred[0] == 1, ref[0] == 1, spacing[1:]))
    assert got < 10  # the 999 mm dummy axis plays no part
    empty = case_metrics(np.zeros_like(ref), ref, [1], spacing)[1]["hd95"]
    assert empty == pytest.approx(math.hypot(6.0, 6.0))


# -- agreement with independent implementations on random inputs --------------------------

def _random_blobs(rng: np.random.Generator, shape, n_labels: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.normal(size=(n_labels, *shape)), sigma=(0, 1.5, 1.5, 1.5))
    labels = np.argmax(noise, axis=0)
    return labels.astype(np.int16)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force_pairwise_distances(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 11, 10)
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    pred = _random_blobs(rng, shape, 3)
    ref = _random_blobs(rng, shape, 3)
    got = case_metrics(pred, ref, [0, 1, 2], spacing)
    for value in (0, 1, 2):
        p, r = pred == value, ref == value
        if p.any() and r.any():
            assert got[value]["hd95"] == pytest.approx(brute_hd95(p, r, spacing), rel=1e-9, abs=1e-9)


def test_hd95_crop_does_not_change_the_result_near_the_border():
    # Masks touching the array border: border voxels are surface in the full image too.
    rng = np.random.default_rng(7)
    pred = np.zeros((10, 10, 10), bool)
    ref = np.zeros_like(pred)
    pred[0:4, 0:6, 3:10] = True
    ref[1:6, 0:3, 5:10] = True
    pred &= rng.random(pred.shape) > 0.1
    spacing = (1.5, 1.0, 0.75)
    assert hd95(pred, ref, spacing) == pytest.approx(brute_hd95(pred, ref, spacing))


@pytest.mark.parametrize("seed", range(3))
def test_dice_iou_accuracy_match_sklearn(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(100 + seed)
    pred = _random_blobs(rng, (8, 9, 10), 4)
    ref = _random_blobs(rng, (8, 9, 10), 4)
    label_values = [0, 1, 2, 3]
    got = case_metrics(pred, ref, label_values, (1.0, 1.0, 1.0))
    f1 = sklearn_metrics.f1_score(ref.ravel(), pred.ravel(), labels=label_values, average=None)
    jac = sklearn_metrics.jaccard_score(ref.ravel(), pred.ravel(), labels=label_values, average=None)
    for i, value in enumerate(label_values):
        assert got[value]["dice"] == pytest.approx(f1[i])
        assert got[value]["iou"] == pytest.approx(jac[i])
        expected_acc = np.mean((pred == value) == (ref == value))
        assert got[value]["accuracy"] == pytest.approx(expected_acc)


def test_label_values_need_not_be_contiguous_and_unknown_values_are_ignored():
    pred = np.zeros((4, 5, 6), np.int16)
    ref = np.zeros_like(pred)
    ref[1:3, 1:3, 1:3] = 7
    pred[1:3, 1:3, 1:2] = 7
    pred[0, 0, 0] = 99  # not a scored label
    got = case_metrics(pred, ref, [7, 0], (1.0, 1.0, 1.0))
    assert list(got) == [7, 0]
    assert got[7]["dice"] == pytest.approx(2 * 4 / (4 + 8))
    assert got[0]["iou"] == pytest.approx((pred.size - 8 - 1) / (pred.size - 4))


def test_exhaustive_tiny_2d_masks_agree_with_brute_force():
    # Every pair of 3x3 masks from a small family, inside a 5x5 grid.
    rng = np.random.default_rng(3)
    masks = [rng.random((5, 5)) > 0.5 for _ in range(12)]
    for a, b in itertools.combinations(masks, 2):
        if a.any() and b.any():
            assert hd95(a, b, (0.9, 1.3)) == pytest.approx(brute_hd95(a, b, (0.9, 1.3)))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), [1], (1, 1, 1))

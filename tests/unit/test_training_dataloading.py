"""The batchgenerators pipeline: shapes, foreground oversampling, padding, workers, determinism."""

from __future__ import annotations

import multiprocessing
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedseg.training.dataloading import BatchStream, PatchDataLoader, downsample_nearest, enlarged_patch_size


@dataclass
class FakeCase:
    case_id: str
    data: np.ndarray
    seg: np.ndarray
    properties: dict


def make_case(case_id: str, shape=(40, 40, 40), blob=(slice(30, 34),) * 3, seed=0, channels=1) -> FakeCase:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(channels, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), dtype=np.int16)
    seg[(0, *blob)] = 1
    seg[0, :1] = -1  # a slab outside the nonzero mask
    locations = np.argwhere(seg[0] == 1).tolist()
    return FakeCase(case_id, data, seg, {"class_locations": {"1": locations}})


SCALES_3D = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]


def test_batch_shapes_3d_with_deep_supervision_targets():
    cases = [make_case("a", channels=2), make_case("b", seed=1, channels=2)]
    with BatchStream(cases, [16, 16, 16], 3, 0.33, SCALES_3D, num_workers=0, seed=0) as stream:
        batch = next(stream)
    assert batch["data"].shape == (3, 2, 16, 16, 16) and batch["data"].dtype == torch.float32
    assert [tuple(t.shape) for t in batch["target"]] == [(3, 1, 16, 16, 16), (3, 1, 8, 8, 8), (3, 1, 4, 4, 4)]
    assert set(torch.unique(batch["target"][0]).tolist()) <= {0.0, 1.0}  # -1 became background
    assert len(batch["keys"]) == 3


def test_batch_shapes_2d_sample_slices():
    cases = [make_case("a", shape=(5, 30, 30), blob=(slice(1, 4), slice(10, 14), slice(10, 14)))]
    with BatchStream(cases, [24, 24], 4, 0.5, [[1.0, 1.0], [0.5, 0.5]], num_workers=0, seed=0) as stream:
        batch = next(stream)
    assert batch["data"].shape == (4, 1, 24, 24)
    assert [tuple(t.shape) for t in batch["target"]] == [(4, 1, 24, 24), (4, 1, 12, 12)]


def test_oversampling_forces_foreground_into_the_last_samples():
    cases = [make_case("a"), make_case("b", seed=1)]
    loader = PatchDataLoader(cases, 4, [16, 16, 16], [16, 16, 16], 0.5)
    assert [loader.force_foreground(i) for i in range(4)] == [False, False, True, True]
    forced_hits, free_hits = 0, 0
    with BatchStream(cases, [16, 16, 16], 4, 0.5, None, num_workers=0, seed=1) as stream:
        for _ in range(15):
            target = next(stream)["target"]
            fg = (target.flatten(1) == 1).any(1)
            forced_hits += int(fg[2:].sum())
            free_hits += int(fg[:2].sum())
    assert forced_hits == 30            # every forced sample contains foreground
    assert free_hits < 20               # random 16^3 patches of a 40^3 case mostly miss a 4^3 blob


def test_small_case_is_padded():
    case = make_case("small", shape=(10, 12, 9), blob=(slice(4, 6),) * 3)
    with BatchStream([case], [16, 16, 16], 2, 0.0, None, num_workers=0, seed=0, augment=False) as stream:
        batch = next(stream)
    assert batch["data"].shape == (2, 1, 16, 16, 16)
    data = batch["data"][0, 0].numpy()
    assert np.count_nonzero(data) == 10 * 12 * 9    # the whole case, zero padding around it
    assert set(torch.unique(batch["target"]).tolist()) <= {0.0, 1.0}


def test_same_seed_same_batches_and_global_rng_untouched():
    cases = [make_case("a"), make_case("b", seed=1)]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    before_py = random.getstate()
    with BatchStream(cases, [16, 16, 16], 2, 0.5, SCALES_3D, num_workers=0, seed=5) as s1:
        a = [next(s1) for _ in range(3)]
    assert np.array_equal(np.random.get_state()[1], before)
    assert random.getstate() == before_py
    with BatchStream(cases, [16, 16, 16], 2, 0.5, SCALES_3D, num_workers=0, seed=5) as s2:
        b = [next(s2) for _ in range(3)]
    with BatchStream(cases, [16, 16, 16], 2, 0.5, SCALES_3D, num_workers=0, seed=6) as s3:
        c = next(s3)
    for x, y in zip(a, b):
        assert torch.equal(x["data"], y["data"]) and torch.equal(x["target"][1], y["target"][1])
    assert not torch.equal(a[0]["data"], c["data"])


def test_background_workers_produce_batches_deterministically_and_shut_down():
    cases = [make_case("a"), make_case("b", seed=1)]
    runs = []
    for _ in range(2):
        stream = BatchStream(cases, [16, 16, 16], 2, 0.5, SCALES_3D, num_workers=2, seed=9)
        try:
            runs.append([next(stream) for _ in range(4)])
            assert len(multiprocessing.active_children()) >= 2
        finally:
            stream.close()
        assert multiprocessing.active_children() == []
    for x, y in zip(*runs):
        assert x["data"].shape == (2, 1, 16, 16, 16)
        assert torch.equal(x["data"], y["data"])
    with pytest.raises(StopIteration):
        next(stream)


def test_downsample_nearest_and_enlarged_patch():
    seg = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    small = downsample_nearest(seg, [0.5, 0.5])
    assert small.shape == (1, 1, 2, 2)
    assert set(small.ravel().tolist()) <= set(seg.ravel().tolist())
    big = enlarged_patch_size([32, 32, 32], (-np.pi / 6, np.pi / 6))
    assert all(b > 32 for b in big)
    assert enlarged_patch_size([24, 24], (-np.pi, np.pi)) == [28, 28]

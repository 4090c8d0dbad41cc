"""The batchgenerators training pipeline: patch sampling, augmentation, background workers.

Follows nnU-Net v2 (nnUNetDataLoader + nnUNetTrainer.get_training_transforms):
- the loader cuts an enlarged patch (large enough that rotation and scaling never pull in
  empty corners), padding with 0 (data) / -1 (seg) where the case is smaller;
- the last round(batch * p) samples of every batch are centred on a random foreground voxel
  taken from properties["class_locations"] (foreground oversampling);
- SpatialTransform (rotation, scaling, no elastic deformation) centre-crops to the patch,
  then noise, blur, brightness, contrast, gamma, mirroring;
- -1 becomes background, targets are downsampled to every deep-supervision output, arrays
  become float tensors (in the consuming process, see TO_TENSOR).

2D configurations sample one z-slice per sample from the (C, z, y, x) volumes.

batchgenerators' transforms draw from numpy's global RNG. Background workers seed it per
process (MultiThreadedAugmenter(seeds=...)); the in-process path swaps in its own RNG state
around each batch, so batches are deterministic in both modes and the caller's global numpy
state is left alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import NumpyToTensor, RemoveLabelTransform

# nnU-Net's rotation ranges: +-30 degrees per axis in 3D, +-180 degrees in 2D.
ROTATION_3D = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
ROTATION_2D = (-np.pi, np.pi)
# nnU-Net's scaling range for augmentation, and the (narrower) range it assumes when
# enlarging the sampled patch (get_patch_size(..., (0.85, 1.25))).
SCALE_RANGE = (0.7, 1.4)
PATCH_ENLARGE_SCALE_RANGE = (0.85, 1.25)
# Probabilities as in nnUNetTrainer.get_training_transforms.
P_ROTATION = 0.2
P_SCALE = 0.2
# Label given to padding outside the image; becomes background before the loss.
SEG_PAD_VALUE = -1
# Batches each background worker keeps ready (batchgenerators' recommendation).
CACHED_PER_WORKER = 2


class TrainingCase(Protocol):
    """What the loader needs of a preprocessed case (fedseg.training.preprocessing.PreprocessedCase)."""

    case_id: str
    data: np.ndarray          # (C, z, y, x) float32
    seg: np.ndarray           # (1, z, y, x) int16 class indices, -1 outside the nonzero mask
    properties: dict


def enlarged_patch_size(patch_size: Sequence[int], rotation: tuple[float, float], scale_range=PATCH_ENLARGE_SCALE_RANGE) -> list[int]:
    """nnU-Net's get_patch_size: the patch to cut so that the rotated/scaled final patch stays inside it."""
    rot = min(max(abs(rotation[0]), abs(rotation[1])), np.pi / 2)
    coords = np.array(patch_size, dtype=float)
    final = np.copy(coords)
    if len(coords) == 3:
        for angles in ((rot, 0, 0), (0, rot, 0), (0, 0, rot)):
            final = np.max(np.vstack((np.abs(rotate_coords_3d(coords, *angles)), final)), 0)
    elif len(coords) == 2:
        final = np.max(np.vstack((np.abs(rotate_coords_2d(coords, rot)), final)), 0)
    else:
        raise ValueError("patch must be 2D or 3D")
    final /= min(scale_range)
    return [int(v) for v in final.astype(int)]


def _foreground_locations(properties: dict) -> list[np.ndarray]:
    """Non-empty per-class voxel lists ((n, 3) int arrays, z/y/x), background excluded, in a fixed order."""
    locations = properties.get("class_locations") or {}
    out = []
    for key in sorted(locations, key=lambda k: int(k)):
        if int(key) == 0:
            continue
        voxels = np.asarray(locations[key], dtype=np.int64).reshape(-1, 3)
        if len(voxels):
            out.append(voxels)
    return out


class PatchDataLoader(DataLoader):
    """Infinite random batches {"data": (b, C, *patch), "seg": (b, 1, *patch), "keys": [case ids]}.

    `patch_size` is the size cut from the cases (the enlarged patch when augmenting);
    `final_patch_size` the size after augmentation, used to let patch centres reach the border.
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        batch_size: int,
        patch_size: Sequence[int],
        final_patch_size: Sequence[int],
        oversample_foreground_percent: float,
        num_threads_in_multithreaded: int = 1,
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        super().__init__(list(cases), batch_size, num_threads_in_multithreaded, None, infinite=True)
        self.indices = list(range(len(cases)))
        self.patch_size = [int(p) for p in patch_size]
        self.final_patch_size = [int(p) for p in final_patch_size]
        self.oversample_foreground_percent = float(oversample_foreground_percent)
        self.is_2d = len(self.patch_size) == 2
        self.n_channels = cases[0].data.shape[0]
        # Precomputed once: foreground voxel lists per case (used for oversampling).
        self._fg = [_foreground_locations(c.properties) for c in cases]

    def force_foreground(self, sample_idx: int) -> bool:
        """nnU-Net's get_do_oversample: the last round(b * p) samples of a batch are forced."""
        return not sample_idx < round(self.batch_size * (1 - self.oversample_foreground_percent))

    def generate_train_batch(self) -> dict[str, Any]:
        chosen = self.get_indices()
        data = np.zeros((self.batch_size, self.n_channels, *self.patch_size), dtype=np.float32)
        seg = np.zeros((self.batch_size, 1, *self.patch_size), dtype=np.int16)
        keys = []
        for j, i in enumerate(chosen):
            case = self._data[i]
            keys.append(case.case_id)
            data[j], seg[j] = self._sample(case, self._fg[i], self.force_foreground(j))
        return {"data": data, "seg": seg, "keys": keys}

    def _sample(self, case: TrainingCase, fg: list[np.ndarray], force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        voxel = None
        if force_fg and fg:
            voxels = fg[np.random.choice(len(fg))]
            voxel = voxels[np.random.choice(len(voxels))]
        if self.is_2d:
            z = int(voxel[0]) if voxel is not None else int(np.random.choice(case.data.shape[1]))
            img, lab = case.data[:, z], case.seg[:, z]
            center = voxel[1:] if voxel is not None else None
        else:
            img, lab = case.data, case.seg
            center = voxel
        lo, hi = self._bbox(img.shape[1:], center)
        return _crop_pad(img, lo, hi, 0.0), _crop_pad(lab, lo, hi, SEG_PAD_VALUE)

    def _bbox(self, shape: Sequence[int], center: np.ndarray | None) -> tuple[list[int], list[int]]:
        """nnU-Net's get_bbox: a random box, or one centred on `center`, possibly reaching into padding."""
        dim = len(self.patch_size)
        need = [self.patch_size[d] - self.final_patch_size[d] for d in range(dim)]
        for d in range(dim):
            if need[d] + shape[d] < self.patch_size[d]:
                need[d] = self.patch_size[d] - shape[d]
        lbs = [-need[d] // 2 for d in range(dim)]
        ubs = [shape[d] + need[d] // 2 + need[d] % 2 - self.patch_size[d] for d in range(dim)]
        if center is None:
            lo = [int(np.random.randint(lbs[d], ubs[d] + 1)) for d in range(dim)]
        else:
            lo = [max(lbs[d], int(center[d]) - self.patch_size[d] // 2) for d in range(dim)]
        return lo, [lo[d] + self.patch_size[d] for d in range(dim)]


def _crop_pad(array: np.ndarray, lo: Sequence[int], hi: Sequence[int], pad_value: float) -> np.ndarray:
    """array[:, lo:hi] with out-of-range parts filled by pad_value (array is (C, *spatial))."""
    spatial = array.shape[1:]
    valid_lo = [max(0, v) for v in lo]
    valid_hi = [min(s, v) for s, v in zip(spatial, hi)]
    cut = array[(slice(None), *[slice(a, b) for a, b in zip(valid_lo, valid_hi)])]
    pad = [(0, 0)] + [(a - l, h - b) for l, a, b, h in zip(lo, valid_lo, valid_hi, hi)]
    if any(p != (0, 0) for p in pad):
        cut = np.pad(cut, pad, mode="constant", constant_values=pad_value)
    return cut


class DownsampleSegForDS(AbstractTransform):
    """Target pyramid for deep supervision: nearest-neighbour downsampling of `seg` to each scale.

    Writes a list (highest resolution first) to `output_key`; voxel i of a level takes the
    input voxel under its centre, so label values are never mixed.
    """

    def __init__(self, scales: Sequence[Sequence[float]], input_key: str = "seg", output_key: str = "target") -> None:
        self.scales = [list(s) for s in scales]
        self.input_key = input_key
        self.output_key = output_key

    def __call__(self, **data_dict):
        seg = data_dict.pop(self.input_key)
        data_dict[self.output_key] = [downsample_nearest(seg, s) for s in self.scales]
        return data_dict


def downsample_nearest(seg: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """(b, c, *spatial) -> spatial sizes round(n * scale), sampling the voxel under each output centre."""
    if all(s == 1 for s in scale):
        return seg
    index = []
    for n_in, s in zip(seg.shape[2:], scale):
        n_out = max(1, int(round(n_in * s)))
        index.append(np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1))
    return seg[(slice(None), slice(None), *np.ix_(*index))]


class SeedPythonRandom(AbstractTransform):
    """Reseed Python's `random` from numpy's RNG before each batch.

    A few batchgenerators augmentations (GaussianNoise's variance) draw from Python's
    `random`, which MultiThreadedAugmenter does not seed; deriving it from the (seeded) numpy
    stream makes those draws deterministic too.
    """

    def __call__(self, **data_dict):
        random.seed(int(np.random.randint(0, 2**31 - 1)))
        return data_dict


class RenameKey(AbstractTransform):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def __call__(self, **data_dict):
        data_dict[self.new] = data_dict.pop(self.old)
        return data_dict


def training_transforms(
    patch_size: Sequence[int],
    deep_supervision_scales: Sequence[Sequence[float]] | None,
    augment: bool = True,
) -> Compose:
    """nnU-Net's training augmentation (minus low-resolution simulation), then targets and tensors."""
    dim = len(patch_size)
    transforms: list[AbstractTransform] = [SeedPythonRandom()]
    if augment:
        rotation = ROTATION_3D if dim == 3 else ROTATION_2D
        transforms += [
            SpatialTransform(
                list(patch_size),
                patch_center_dist_from_border=None,
                do_elastic_deform=False,
                do_rotation=True,
                angle_x=rotation,
                angle_y=rotation if dim == 3 else (0, 0),
                angle_z=rotation if dim == 3 else (0, 0),
                p_rot_per_axis=1,
                do_scale=True,
                scale=SCALE_RANGE,
                border_mode_data="constant",
                border_cval_data=0,
                order_data=3,
                border_mode_seg="constant",
                border_cval_seg=SEG_PAD_VALUE,
                order_seg=1,
                random_crop=False,   # the loader already chose the location; centre-crop the enlarged patch
                p_el_per_sample=0,
                p_scale_per_sample=P_SCALE,
                p_rot_per_sample=P_ROTATION,
                independent_scale_for_each_axis=False,
            ),
            GaussianNoiseTransform(p_per_sample=0.1),
            GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
            BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
            ContrastAugmentationTransform(p_per_sample=0.15),
            GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
            GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
            MirrorTransform(tuple(range(dim))),
        ]
    transforms.append(RemoveLabelTransform(SEG_PAD_VALUE, 0))
    if deep_supervision_scales is not None:
        transforms.append(DownsampleSegForDS(deep_supervision_scales, "seg", "target"))
    else:
        transforms.append(RenameKey("seg", "target"))
    return Compose(transforms)


# Tensors are made in the consuming process: torch tensors sent through a multiprocessing
# queue travel as shared-memory file descriptors, which break when a worker exits while its
# last batch is still in flight (seen as FileNotFoundError at shutdown). Numpy arrays travel
# as plain bytes, and torch.from_numpy is zero-copy, so nothing is lost.
TO_TENSOR = NumpyToTensor(["data", "target"], "float")


class _InProcessAugmenter:
    """SingleThreadedAugmenter with its own numpy RNG stream (swapped in around each batch).

    Python's `random` state is restored too (SeedPythonRandom reseeds it per batch).
    """

    def __init__(self, loader: PatchDataLoader, transform: Compose, seed: int) -> None:
        self.loader = loader
        self.transform = transform
        self._state = np.random.RandomState(seed).get_state()

    def __next__(self) -> dict:
        saved, saved_py = np.random.get_state(), random.getstate()
        np.random.set_state(self._state)
        try:
            item = self.transform(**next(self.loader))
            self._state = np.random.get_state()
        finally:
            np.random.set_state(saved)
            random.setstate(saved_py)
        return item

    def close(self) -> None:
        pass


class _WorkerAugmenter:
    """batchgenerators' MultiThreadedAugmenter (one process per worker, per-worker seeds)."""

    def __init__(self, loader: PatchDataLoader, transform: Compose, num_workers: int, seed: int) -> None:
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(num_workers)]
        self._mta = MultiThreadedAugmenter(loader, transform, num_workers, CACHED_PER_WORKER, seeds=seeds)

    def __next__(self) -> dict:
        return next(self._mta)

    def close(self) -> None:
        # batchgenerators has no public stop; _finish pauses, drains and joins the workers
        # (terminating stragglers after a timeout), which is what its own __del__ calls.
        self._mta._finish()


class BatchStream:
    """Infinite iterator of training batches; close() (or `with`) stops background workers.

    Deterministic given (seed, num_workers): with workers, batch k comes from worker
    k mod n, each with its own seed, so a different worker count gives a different (equally
    valid) random stream.
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        patch_size: Sequence[int],
        batch_size: int,
        oversample_foreground_percent: float = 0.33,
        deep_supervision_scales: Sequence[Sequence[float]] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        final = [int(p) for p in patch_size]
        if augment:
            rotation = ROTATION_3D if len(final) == 3 else ROTATION_2D
            cut = enlarged_patch_size(final, rotation)
        else:
            cut = final
        self.loader = PatchDataLoader(cases, batch_size, cut, final, oversample_foreground_percent, max(1, num_workers))
        transform = training_transforms(final, deep_supervision_scales, augment)
        if num_workers > 0:
            self._impl: _InProcessAugmenter | _WorkerAugmenter = _WorkerAugmenter(self.loader, transform, num_workers, seed)
        else:
            self._impl = _InProcessAugmenter(self.loader, transform, seed)
        self._closed = False

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        return TO_TENSOR(**next(self._impl))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._impl.close()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: multiprocessing may already be gone
            pass

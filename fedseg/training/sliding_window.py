"""Sliding-window prediction of a preprocessed array, as nnU-Net predicts.

The array is covered by overlapping patch-sized tiles; each tile's network output is weighted
by a Gaussian importance map (tile centres are more reliable than tile borders, where the
network saw less context), and the weighted sum is divided by the summed weights.
`sliding_window_logits` combines logits (what fedseg.training.inference resamples to a case's
geometry, as nnU-Net does); `sliding_window_probabilities` combines softmax (or per-region
sigmoid) outputs instead, for callers that want probabilities on the preprocessed grid.

2D configurations predict every z slice of the (C, z, y, x) array with the 2D network.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from fedseg.training.device import autocast

# nnU-Net's default overlap: tiles advance by half a patch, so every voxel away from the
# border is seen by 2^ndim tiles.
DEFAULT_STEP_SIZE = 0.5
# nnU-Net's Gaussian width: sigma = patch / 8 per axis.
GAUSSIAN_SIGMA_SCALE = 1.0 / 8
# Tiles per forward pass: enough to keep a GPU busy on small patches, small enough for CPU RAM.
TILES_PER_BATCH = 4


def compute_steps_for_sliding_window(
    image_size: Sequence[int], tile_size: Sequence[int], step_size: float
) -> list[list[int]]:
    """Tile start positions per axis (nnU-Net's rule).

    The number of tiles is the fewest that keep the step at most `step_size * tile`;
    the steps are then spread evenly so the first tile starts at 0 and the last ends at the
    image border. `image_size` must be at least `tile_size` on every axis (pad first).
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    if len(image_size) != len(tile_size) or any(i < t for i, t in zip(image_size, tile_size)):
        raise ValueError(f"image size {tuple(image_size)} must be at least the tile size {tuple(tile_size)}")
    steps = []
    for size, tile in zip(image_size, tile_size):
        target_step = tile * step_size
        n_steps = int(np.ceil((size - tile) / target_step)) + 1
        max_start = size - tile
        actual_step = max_start / (n_steps - 1) if n_steps > 1 else 0.0
        steps.append([int(np.round(actual_step * i)) for i in range(n_steps)])
    return steps


def gaussian_importance_map(tile_size: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """nnU-Net's Gaussian weighting of a tile: peak 1 at the centre, sigma = tile * sigma_scale.

    Zeros (far corners underflow) are raised to the smallest positive value: every voxel of
    a tile must carry some weight, otherwise a voxel covered only by tile corners would be
    divided by zero.
    """
    impulse = np.zeros(tuple(tile_size), dtype=np.float64)
    impulse[tuple(t // 2 for t in tile_size)] = 1.0
    gaussian = gaussian_filter(impulse, [t * sigma_scale for t in tile_size], order=0, mode="constant", cval=0.0)
    gaussian /= gaussian.max()
    positive = gaussian > 0
    gaussian[~positive] = gaussian[positive].min()
    return gaussian.astype(np.float32)


@contextlib.contextmanager
def inference_mode(network: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with deep supervision off for the duration; the previous state is restored."""
    was_training = network.training
    had_flag = hasattr(network, "deep_supervision")
    previous_flag = getattr(network, "deep_supervision", None)
    network.eval()
    if had_flag:
        network.deep_supervision = False
    try:
        with torch.inference_mode():
            yield network
    finally:
        if had_flag:
            network.deep_supervision = previous_flag
        network.train(was_training)


def sliding_window_probabilities(
    network: nn.Module,
    data: np.ndarray,
    patch_size: Sequence[int],
    n_classes: int,
    step_size: float = DEFAULT_STEP_SIZE,
    mirror: bool = False,
    device: str | torch.device = "cpu",
    tiles_per_batch: int = TILES_PER_BATCH,
    regions: bool = False,
    precision: str = "auto",
) -> np.ndarray:
    """Class probabilities (K, z, y, x) float32 for a preprocessed (C, z, y, x) array.

    `regions`: the outputs are independent regions (a sigmoid each) rather than classes
    (softmax over K).

    A 3-entry `patch_size` tiles the volume; a 2-entry one predicts each z slice in 2D.
    The network runs in eval mode without deep supervision (`inference_mode`, restored
    afterwards); a list output is tolerated and its first, full-resolution entry used.
    `precision` (auto, fp32, bf16) is the network's arithmetic (fedseg.training.device); tiles
    are combined in float32 whatever it is.
    """
    with inference_mode(network):
        return _sliding_window(network, data, patch_size, n_classes, step_size, mirror, device, tiles_per_batch,
                               "sigmoid" if regions else "softmax", precision)


def sliding_window_logits(
    network: nn.Module,
    data: np.ndarray,
    patch_size: Sequence[int],
    n_classes: int,
    step_size: float = DEFAULT_STEP_SIZE,
    mirror: bool = False,
    device: str | torch.device = "cpu",
    tiles_per_batch: int = TILES_PER_BATCH,
    precision: str = "auto",
) -> np.ndarray:
    """Network outputs (K, z, y, x) float32 before softmax, combined over tiles and flips.

    This is how nnU-Net's predictor combines them (Gaussian-weighted mean of logits, mean
    over mirrorings) and what its export resamples to the original geometry before the
    argmax; `predict_case` does the same, so a model gives the same label map in both tools.
    Combining probabilities instead moves boundary voxels wherever the case is resampled.
    """
    with inference_mode(network):
        return _sliding_window(network, data, patch_size, n_classes, step_size, mirror, device, tiles_per_batch,
                               nonlinearity=None, precision=precision)


def _apply_nonlinearity(out: torch.Tensor, nonlinearity: str | None) -> torch.Tensor:
    if nonlinearity is None:
        return out
    if nonlinearity == "sigmoid":
        return torch.sigmoid(out)
    return torch.softmax(out, dim=1)


def _sliding_window(
    network: nn.Module,
    data: np.ndarray,
    patch_size: Sequence[int],
    n_classes: int,
    step_size: float,
    mirror: bool,
    device: str | torch.device,
    tiles_per_batch: int,
    nonlinearity: str | None = "softmax",
    precision: str = "auto",
) -> np.ndarray:
    if data.ndim != 4:
        raise ValueError(f"expected (C, z, y, x) data, got shape {data.shape}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) not in (2, 3):
        raise ValueError(f"patch size must have 2 or 3 entries, got {patch}")
    slice_wise = len(patch) == 2
    spatial = data.shape[1:]
    tiled = spatial[1:] if slice_wise else spatial  # the axes the tiles run over

    # Pad to at least one patch, half on each side (nnU-Net pads the same way, with zeros:
    # after normalisation 0 is the mean intensity).
    padded_tiled = tuple(max(s, p) for s, p in zip(tiled, patch))
    pad = [((p - s) // 2, (p - s) - (p - s) // 2) for s, p in zip(tiled, padded_tiled)]
    full_pad = [(0, 0)] + ([(0, 0)] if slice_wise else []) + pad
    data = np.ascontiguousarray(data, dtype=np.float32)
    # np.pad always copies: a case at least one patch large is used as it is.
    padded = np.pad(data, full_pad, mode="constant", constant_values=0.0) if any(sum(p) for p in pad) else data

    steps = compute_steps_for_sliding_window(padded_tiled, patch, step_size)
    tile_slices = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in itertools.product(*steps)]
    if slice_wise:
        tiles = [(z, *t) for z in range(spatial[0]) for t in tile_slices]
    else:
        tiles = tile_slices

    device = torch.device(device)
    source = torch.from_numpy(padded).to(device)
    gaussian = torch.from_numpy(gaussian_importance_map(patch)).to(device)
    probs = torch.zeros((n_classes, *padded.shape[1:]), dtype=torch.float32, device=device)
    weights = torch.zeros(padded.shape[1:], dtype=torch.float32, device=device)

    for first in range(0, len(tiles), tiles_per_batch):
        batch_tiles = tiles[first : first + tiles_per_batch]
        batch = torch.stack([source[(slice(None), *t)] for t in batch_tiles])
        with autocast(device, precision):   # auto: float16 on CUDA (as nnU-Net predicts); combined in float32 below
            tile_probs = _predict_tiles(network, batch, n_classes, mirror, nonlinearity)
        for tile, tile_prob in zip(batch_tiles, tile_probs):
            probs[(slice(None), *tile)] += tile_prob * gaussian
            weights[tile] += gaussian

    probs /= weights
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad, tiled))
    if slice_wise:
        crop = (slice(None), *crop)
    return probs[(slice(None), *crop)].cpu().numpy()


def _predict_tiles(
    network: nn.Module, batch: torch.Tensor, n_classes: int, mirror: bool, nonlinearity: str | None = "softmax",
) -> torch.Tensor:
    """Softmax ("softmax"), per-region sigmoid ("sigmoid") or raw logits (None) of a batch of
    tiles (B, K, *patch), averaged over all axis flips if `mirror`."""
    spatial_axes = list(range(2, batch.ndim))
    flip_sets = (
        [combo for r in range(len(spatial_axes) + 1) for combo in itertools.combinations(spatial_axes, r)]
        if mirror
        else [()]
    )
    total = None
    for axes in flip_sets:
        x = torch.flip(batch, axes) if axes else batch
        out = network(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        if out.shape[1] != n_classes or tuple(out.shape[2:]) != tuple(batch.shape[2:]):
            raise ValueError(
                f"network output shape {tuple(out.shape)} does not match {n_classes} classes on tiles "
                f"{tuple(batch.shape[2:])}"
            )
        prob = _apply_nonlinearity(out.float(), nonlinearity)
        if axes:
            prob = torch.flip(prob, axes)
        total = prob if total is None else total + prob
    return total / len(flip_sets)

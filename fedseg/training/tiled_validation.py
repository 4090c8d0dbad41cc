"""Validation during training: whole cases tiled with non-overlapping patches, scored by Dice.

Cheap and memory-bounded; the sliding-window Gaussian blend of inference
(fedseg.training.sliding_window) is not needed for a training-time validation score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedseg.training.device import autocast


def _tile_starts(n: int, p: int) -> list[int]:
    starts = list(range(0, max(n - p, 0) + 1, p))
    if starts[-1] + p < n:
        starts.append(n - p)
    return starts


def argmax_decoder(logits: torch.Tensor) -> torch.Tensor:
    """(K, ...) logits -> class indices (softmax classes)."""
    return logits.argmax(0)


def region_decoder(paint: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(R, ...) region logits -> class indices, painted as a prediction is (fedseg.data.labels):
    in turn, region r gets class index `paint[r]` where its sigmoid exceeds 0.5."""

    def decode(logits: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(logits.shape[1:], dtype=torch.long, device=logits.device)
        for r, index in enumerate(paint):
            out[logits[r] > 0] = index   # sigmoid > 0.5
        return out

    return decode


@torch.no_grad()
def predict_indices(
    network: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: str,
    decode: Callable[[torch.Tensor], torch.Tensor] = argmax_decoder, precision: str = "auto",
) -> np.ndarray:
    """Class-index map (z, y, x) of a preprocessed case: the volume is padded to at least the
    patch and covered by patch-sized tiles (last tile aligned to the border), one forward pass
    each. `decode` turns a tile's logits into class indices."""
    is_2d = len(patch_size) == 2
    spatial = data.shape[2:] if is_2d else data.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch_size, spatial)]
    pad_lo = [p // 2 for p in pad]
    widths = [(0, 0)] * (2 if is_2d else 1) + [(lo, p - lo) for lo, p in zip(pad_lo, pad)]
    padded = np.pad(data, widths, mode="constant") if any(pad) else data
    full = padded.shape[2:] if is_2d else padded.shape[1:]
    starts = [_tile_starts(n, p) for n, p in zip(full, patch_size)]
    slices = [z for z in range(padded.shape[1])] if is_2d else [None]
    out_shape = (padded.shape[1], *full) if is_2d else tuple(full)
    result = np.zeros(out_shape, dtype=np.int16)
    for z in slices:
        volume = padded[:, z] if is_2d else padded
        for corner in np.ndindex(*[len(s) for s in starts]):
            lo = [starts[d][corner[d]] for d in range(len(patch_size))]
            window = tuple(slice(a, a + p) for a, p in zip(lo, patch_size))
            labels = _tile_indices(network, volume[(slice(None), *window)], device, decode, precision)
            if is_2d:
                result[(z, *window)] = labels
            else:
                result[window] = labels
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, spatial))
    return result[(slice(None), *crop)] if is_2d else result[crop]


def _tile_indices(
    network: nn.Module, tile: np.ndarray, device: str, decode: Callable[[torch.Tensor], torch.Tensor],
    precision: str,
) -> np.ndarray:
    """Class indices (int16) of one (C, *patch) tile: one forward pass, the highest-resolution output."""
    x = torch.from_numpy(np.ascontiguousarray(tile))[None].to(device)
    with autocast(device, precision):
        logits = network(x)
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return decode(logits[0]).cpu().numpy().astype(np.int16)


def foreground_dice(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], n_classes: int,
    region_class_indices: Sequence[Sequence[int]] | None = None,
) -> float:
    """Mean over foreground classes of the Dice pooled over all cases (nnU-Net's pseudo Dice).

    Pooling TP/FP/FN over cases keeps small or empty cases from dominating; a class absent
    from both prediction and reference everywhere is left out; NaN when no class is present.
    With `region_class_indices`, each region (the union of its class indices) is scored instead.
    """
    groups = [list(r) for r in region_class_indices] if region_class_indices is not None else [[c] for c in range(1, n_classes)]
    tp = np.zeros(len(groups))
    fp = np.zeros(len(groups))
    fn = np.zeros(len(groups))
    for pred, ref in zip(preds, refs):
        for g, members in enumerate(groups):
            p, r = np.isin(pred, members), np.isin(ref, members)
            tp[g] += np.count_nonzero(p & r)
            fp[g] += np.count_nonzero(p & ~r)
            fn[g] += np.count_nonzero(~p & r)
    denom = 2 * tp + fp + fn
    present = denom > 0
    if not present.any():
        return float("nan")
    return float(np.mean(2 * tp[present] / denom[present]))

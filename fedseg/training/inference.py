"""Sliding-window inference, as nnU-Net predicts a case.

A case is preprocessed exactly as for training (crop, normalise, resample to the plan's
spacing), covered by overlapping patch-sized tiles, each tile's network output (logits) is
weighted by a Gaussian importance map (tile centres are more reliable than tile borders,
where the network saw less context), the weighted sum is divided by the summed weights, and
the logits are resampled back to the case's original geometry
(`fedseg.training.preprocessing.revert_segmentation`), where the argmax gives dataset.json
label values: nnU-Net's order of operations, so both tools give the same label map for the
same weights. `sliding_window_probabilities` combines softmax outputs instead, for callers
that want probabilities.

2D configurations predict every z slice of the (C, z, y, x) case with the 2D network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from fedseg.data.case_loading import CaseData, check_case_sizes, load_case
from fedseg.data.channels import expand_to_plan, plan_channel_list, site_channel_indices
from fedseg.data.dataset import collect_cases
from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.data.image_io import write_segmentation
from fedseg.training.device import autocast, resolve_device
from fedseg.errors import InputError
from fedseg.planning.plans import ConfigurationPlan, Plans
from fedseg.training.postprocessing import PostprocessingDecision

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
) -> np.ndarray:
    """Class probabilities (K, z, y, x) float32 for a preprocessed (C, z, y, x) array.

    `regions`: the outputs are independent regions (a sigmoid each) rather than classes
    (softmax over K).

    A 3-entry `patch_size` tiles the volume; a 2-entry one predicts each z slice in 2D.
    The network runs in eval mode without deep supervision (`inference_mode`, restored
    afterwards); a list output is tolerated and its first, full-resolution entry used.
    """
    with inference_mode(network):
        return _sliding_window(network, data, patch_size, n_classes, step_size, mirror, device, tiles_per_batch,
                               "sigmoid" if regions else "softmax")


def sliding_window_logits(
    network: nn.Module,
    data: np.ndarray,
    patch_size: Sequence[int],
    n_classes: int,
    step_size: float = DEFAULT_STEP_SIZE,
    mirror: bool = False,
    device: str | torch.device = "cpu",
    tiles_per_batch: int = TILES_PER_BATCH,
) -> np.ndarray:
    """Network outputs (K, z, y, x) float32 before softmax, combined over tiles and flips.

    This is how nnU-Net's predictor combines them (Gaussian-weighted mean of logits, mean
    over mirrorings) and what its export resamples to the original geometry before the
    argmax; `predict_case` does the same, so a model gives the same label map in both tools.
    Combining probabilities instead moves boundary voxels wherever the case is resampled.
    """
    with inference_mode(network):
        return _sliding_window(network, data, patch_size, n_classes, step_size, mirror, device, tiles_per_batch,
                               nonlinearity=None)


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
        with autocast(device):   # float16 on CUDA (as nnU-Net predicts); outputs combined in float32 below
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


def site_channel_layout(plans: Plans, site: str | None) -> list[int] | None:
    """Plan index of each channel `site` holds (None: the plan's own channels, or no site given)."""
    if site is None:
        return None
    return site_channel_indices(plan_channel_list(plans.channel_names), plans.site(site).channels)


@dataclasses.dataclass
class EnsembleMember:
    """One model of an ensemble: a network with the plan and configuration it was trained under.

    `site`: the site whose channel layout the images follow (mix-modal plans), or None.
    """

    network: nn.Module
    plans: Plans
    config: ConfigurationPlan
    site: str | None = None


def predict_case_probabilities(
    network: nn.Module,
    case_data: CaseData,
    plans: Plans,
    config: ConfigurationPlan,
    device: str = "cpu",
    mirror: bool = False,
    step_size: float = DEFAULT_STEP_SIZE,
    site: str | None = None,
) -> np.ndarray:
    """Probabilities (K, z, y, x) float32 of one case in its original geometry: softmax over
    classes (per-region sigmoids for region-based labels).

    As nnU-Net predicts: the tiles' and mirrorings' logits are combined, resampled to the
    original geometry, and only then turned into probabilities (combining probabilities
    instead moves boundary voxels wherever a case is resampled, and would not give the same
    label map as nnU-Net for the same weights).
    `site`: the case holds that site's channels (a mix-modal plan: a subset of the plan's
    channels, laid out in the plan's order with the absent ones zero before preprocessing).
    The network is moved to `device`; its train/eval mode and deep-supervision flag are
    restored afterwards. `mirror` averages the predictions of all axis flips (2^ndim
    forward passes per tile: more robust, 2^ndim times slower).
    """
    from fedseg.training.preprocessing import preprocess_case, revert_logits

    layout = site_channel_layout(plans, site)
    if layout is not None and case_data.data.shape[0] == len(layout):
        case_data = dataclasses.replace(case_data, data=expand_to_plan(case_data.data, layout, plans.n_channels))
    if case_data.data.shape[0] != plans.n_channels:
        raise InputError(
            f"case {case_data.case_id}: {case_data.data.shape[0]} channel(s), the plan expects {plans.n_channels}"
        )
    # A reference label (if loaded) plays no part in prediction; skip its preprocessing.
    preprocessed = preprocess_case(dataclasses.replace(case_data, seg=None), plans, config)
    device = resolve_device(str(device))
    network.to(device)
    layout = plans.label_layout
    logits = sliding_window_logits(
        network,
        preprocessed.data,
        config.patch_size,
        plans.n_classes,
        step_size=step_size,
        mirror=mirror,
        device=device,
    )
    reverted = revert_logits(logits, preprocessed.properties, config, regions=layout.has_regions)
    if reverted.shape[1:] != tuple(case_data.geometry.shape):
        raise RuntimeError(
            f"case {case_data.case_id}: prediction shape {reverted.shape[1:]} differs from the image {case_data.geometry.shape}"
        )
    return reverted


def ensemble_probabilities(
    members: Sequence[EnsembleMember], case_data: CaseData, device: str = "cpu", mirror: bool = False,
    step_size: float = DEFAULT_STEP_SIZE,
) -> np.ndarray:
    """The mean of the members' softmax probabilities for one case (original geometry)."""
    total = None
    for member in members:
        probs = predict_case_probabilities(
            member.network, case_data, member.plans, member.config, device=device, mirror=mirror,
            step_size=step_size, site=member.site,
        )
        total = probs if total is None else total + probs
    return total / len(members)


def probabilities_to_labels(probs: np.ndarray, plans: Plans) -> np.ndarray:
    """argmax over classes as dataset.json label values (int16); region-based plans paint
    each region's sigmoid above 0.5 in `regions_class_order` (as nnU-Net does)."""
    from fedseg.data.labels import paint_regions
    from fedseg.training.preprocessing import argmax_int16, indices_to_label_values

    layout = plans.label_layout
    if layout.has_regions:
        return paint_regions(probs, layout.regions_class_order)
    return np.asarray(indices_to_label_values(argmax_int16(probs), plans.label_values)).astype(np.int16, copy=False)


def predict_case(
    network: nn.Module,
    case_data: CaseData,
    plans: Plans,
    config: ConfigurationPlan,
    device: str = "cpu",
    mirror: bool = False,
    step_size: float = DEFAULT_STEP_SIZE,
    site: str | None = None,
) -> np.ndarray:
    """Segment one case: (z, y, x) int16 array of label values in the case's original geometry
    (arguments as `predict_case_probabilities`)."""
    probs = predict_case_probabilities(network, case_data, plans, config, device, mirror, step_size, site)
    return probabilities_to_labels(probs, plans)


def check_ensemble(members: Sequence[EnsembleMember]) -> None:
    """Members must agree on what they predict: labels, channels and file ending."""
    if not members:
        raise InputError("an ensemble needs at least one model")
    first = members[0].plans
    for member in members[1:]:
        other = member.plans
        if (other.labels, other.channel_names, other.file_ending) != (first.labels, first.channel_names, first.file_ending):
            raise InputError(
                f"models of plans {first.plan_id[:12]}… and {other.plan_id[:12]}… predict different labels, "
                "channels or file endings; an ensemble needs the same dataset"
            )


def predict_folder_ensemble(
    members: Sequence[EnsembleMember],
    images_dir: str | Path,
    out_dir: str | Path,
    device: str = "cpu",
    mirror: bool = False,
    progress: Callable[..., None] | None = None,
    step_size: float = DEFAULT_STEP_SIZE,
    save_probabilities: bool = False,
    postprocessing: PostprocessingDecision | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> list[Path]:
    """Segment every `{CASE}_{XXXX}{ending}` case in `images_dir` into `out_dir/{CASE}{ending}`
    with the mean softmax of `members` (one member: a plain prediction).

    `save_probabilities`: also `out_dir/{CASE}.npz` holding `probabilities` (K, z, y, x) in the
    image's geometry, as nnU-Net's --save_probabilities (no .pkl beside it: fedseg writes no
    pickle). `postprocessing`: the connected-component steps to apply after argmax.
    Each output is written atomically; all cases are checked (channel files complete, no image
    above `max_voxels`) before the first is predicted.
    """
    from fedseg.atomic import atomic_path

    check_ensemble(members)
    plans = members[0].plans
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise InputError("images folder does not exist", images_dir)
    ending = plans.file_ending
    layout = site_channel_layout(plans, members[0].site)
    n_channels = plans.n_channels if layout is None else len(layout)
    cases = collect_cases(images_dir, None, ending, n_channels, require_labels=False)
    check_case_sizes(cases, max_voxels)
    foreground = [v for v in plans.label_values if v != 0]
    written = []
    for case in cases:
        case_data = load_case(case, max_voxels=max_voxels)
        probs = ensemble_probabilities(members, case_data, device=device, mirror=mirror, step_size=step_size)
        seg = probabilities_to_labels(probs, plans)
        if postprocessing is not None:
            seg = postprocessing.apply(seg, foreground)
        target = out_dir / f"{case.case_id}{ending}"
        if save_probabilities:
            with atomic_path(out_dir / f"{case.case_id}.npz") as tmp, open(tmp, "wb") as handle:
                np.savez_compressed(handle, probabilities=probs.astype(np.float32, copy=False))
        write_segmentation(seg, case_data.geometry, target)
        written.append(target)
        if progress is not None:
            progress(1, info=case.case_id)
    return written


def predict_folder(
    network: nn.Module,
    images_dir: str | Path,
    out_dir: str | Path,
    plans: Plans,
    config: ConfigurationPlan,
    device: str = "cpu",
    mirror: bool = False,
    progress: Callable[..., None] | None = None,
    step_size: float = DEFAULT_STEP_SIZE,
    site: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> list[Path]:
    """Segment every `{CASE}_{XXXX}{ending}` case in `images_dir` into `out_dir/{CASE}{ending}`
    with one network (see `predict_folder_ensemble`). `site`: the images hold that site's
    channels (see `predict_case_probabilities`). `progress(1, info=case_id)` is called after
    each case. Returns the written paths.
    """
    member = EnsembleMember(network, plans, config, site)
    return predict_folder_ensemble([member], images_dir, out_dir, device=device, mirror=mirror, progress=progress,
                                   step_size=step_size, max_voxels=max_voxels)

"""Predicting cases as nnU-Net does, with one model or an ensemble, and writing label maps.

A case is preprocessed exactly as for training (crop, normalise, resample to the plan's
spacing), predicted tile by tile (fedseg.training.sliding_window: Gaussian-weighted logits),
and the logits are resampled back to the case's original geometry
(`fedseg.training.preprocessing.revert_logits`), where the argmax gives dataset.json label
values: nnU-Net's order of operations, so both tools give the same label map for the same
weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from fedseg.atomic import atomic_path
from fedseg.data.case_loading import CaseData, check_case_sizes, load_case
from fedseg.data.channels import expand_to_plan, plan_channel_list, site_channel_indices
from fedseg.data.dataset import collect_cases
from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.data.image_io import write_segmentation
from fedseg.data.labels import paint_regions
from fedseg.errors import InputError
from fedseg.planning.plans import ConfigurationPlan, Plans
from fedseg.training.device import resolve_device
from fedseg.training.postprocessing import PostprocessingDecision
from fedseg.training.preprocessing import argmax_int16, indices_to_label_values, preprocess_case, revert_logits
from fedseg.training.sliding_window import (
    DEFAULT_STEP_SIZE,
    GAUSSIAN_SIGMA_SCALE,
    TILES_PER_BATCH,
    compute_steps_for_sliding_window,
    gaussian_importance_map,
    inference_mode,
    sliding_window_logits,
    sliding_window_probabilities,
)

# The sliding-window names are importable from here too (they lived here before).
__all__ = [
    "DEFAULT_STEP_SIZE", "GAUSSIAN_SIGMA_SCALE", "TILES_PER_BATCH", "EnsembleMember", "check_ensemble",
    "compute_steps_for_sliding_window", "ensemble_probabilities", "gaussian_importance_map", "inference_mode",
    "predict_case", "predict_case_probabilities", "predict_folder", "predict_folder_ensemble", "probabilities_to_labels",
    "site_channel_layout", "sliding_window_logits", "sliding_window_probabilities",
]


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
    precision: str = "auto",
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
    forward passes per tile: more robust, 2^ndim times slower). `precision`: the network's
    arithmetic, auto, fp32 or bf16 (fedseg.training.device).
    """
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
        precision=precision,
    )
    reverted = revert_logits(logits, preprocessed.properties, config, regions=layout.has_regions)
    if reverted.shape[1:] != tuple(case_data.geometry.shape):
        raise RuntimeError(
            f"case {case_data.case_id}: prediction shape {reverted.shape[1:]} differs from the image {case_data.geometry.shape}"
        )
    return reverted


def ensemble_probabilities(
    members: Sequence[EnsembleMember], case_data: CaseData, device: str = "cpu", mirror: bool = False,
    step_size: float = DEFAULT_STEP_SIZE, precision: str = "auto",
) -> np.ndarray:
    """The mean of the members' softmax probabilities for one case (original geometry)."""
    total = None
    for member in members:
        probs = predict_case_probabilities(
            member.network, case_data, member.plans, member.config, device=device, mirror=mirror,
            step_size=step_size, site=member.site, precision=precision,
        )
        total = probs if total is None else total + probs
    return total / len(members)


def probabilities_to_labels(probs: np.ndarray, plans: Plans) -> np.ndarray:
    """argmax over classes as dataset.json label values (int16); region-based plans paint
    each region's sigmoid above 0.5 in `regions_class_order` (as nnU-Net does)."""
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
    precision: str = "auto",
) -> np.ndarray:
    """Segment one case: (z, y, x) int16 array of label values in the case's original geometry
    (arguments as `predict_case_probabilities`)."""
    probs = predict_case_probabilities(network, case_data, plans, config, device, mirror, step_size, site, precision)
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
    precision: str = "auto",
) -> list[Path]:
    """Segment every `{CASE}_{XXXX}{ending}` case in `images_dir` into `out_dir/{CASE}{ending}`
    with the mean softmax of `members` (one member: a plain prediction).

    `save_probabilities`: also `out_dir/{CASE}.npz` holding `probabilities` (K, z, y, x) in the
    image's geometry, as nnU-Net's --save_probabilities (no .pkl beside it: fedseg writes no
    pickle). `postprocessing`: the connected-component steps to apply after argmax.
    Each output is written atomically; all cases are checked (channel files complete, no image
    above `max_voxels`) before the first is predicted.
    """
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
        probs = ensemble_probabilities(members, case_data, device=device, mirror=mirror, step_size=step_size,
                                       precision=precision)
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
    precision: str = "auto",
) -> list[Path]:
    """Segment every `{CASE}_{XXXX}{ending}` case in `images_dir` into `out_dir/{CASE}{ending}`
    with one network (see `predict_folder_ensemble`). `site`: the images hold that site's
    channels (see `predict_case_probabilities`). `progress(1, info=case_id)` is called after
    each case. Returns the written paths.
    """
    member = EnsembleMember(network, plans, config, site)
    return predict_folder_ensemble([member], images_dir, out_dir, device=device, mirror=mirror, progress=progress,
                                   step_size=step_size, max_voxels=max_voxels, precision=precision)

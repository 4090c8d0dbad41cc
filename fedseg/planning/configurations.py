"""The configurations of a plan ("3d_fullres", "2d", or one per site): spacing, patch, network,
batch size and normalisation from a merged fingerprint, and the hand-set patch and batch sizes
of `--set configuration.*`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np

from fedseg.data.labels import parse_labels
from fedseg.errors import InputError
from fedseg.planning.budget import DEFAULT_BUDGET, MIN_BATCH_SIZE, batch_size_for, check_compute, estimate_feature_map_voxels
from fedseg.planning.merge import merge_fingerprints
from fedseg.planning.plans import ConfigurationPlan
from fedseg.planning.topology import ANISOTROPY_THRESHOLD, network_for_patch, new_shape, plan_patch_and_network, target_spacing

CONFIGURATIONS = ("3d_fullres", "2d")

# channel name (case-insensitive) -> normalisation scheme, as nnU-Net's
# channel_name_to_normalization_mapping; every other name gets z-scoring.
_SCHEME_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
}
# Only z-scoring keeps the outside of the nonzero mask at 0 when normalising within it, so
# only it may use the mask (nnU-Net's leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true).
_SCHEMES_USING_MASK = {"ZScoreNormalization"}
# Crop removes more than a quarter of the image: the zero frame is not anatomy, so normalise
# within the nonzero mask (nnU-Net's 3/4 rule).
USE_MASK_RELATIVE_SIZE = 0.75



def normalization_schemes(channel_names: Mapping[str, str], median_relative_size: float) -> tuple[list[str], list[bool]]:
    """Per channel: scheme by channel name (CT -> CTNormalization, else z-score), and mask use."""
    ordered = [channel_names[k] for k in sorted(channel_names, key=int)]
    schemes = [_SCHEME_BY_CHANNEL_NAME.get(name.strip().casefold(), "ZScoreNormalization") for name in ordered]
    use_mask = [median_relative_size < USE_MASK_RELATIVE_SIZE and s in _SCHEMES_USING_MASK for s in schemes]
    return schemes, use_mask



def plan_configuration(
    merged: Mapping[str, Any],
    name: str = "3d_fullres",
    budget: float = DEFAULT_BUDGET,
    n_training: int | None = None,
) -> ConfigurationPlan:
    """One configuration ("3d_fullres" or "2d") from a merged fingerprint.

    `n_training` defaults to the merged fingerprint's case count (the global numTraining).
    Strategies that plan per site (asymfedavg) pass a single site's merged fingerprint.
    """
    if name not in CONFIGURATIONS:
        raise InputError(f"configuration must be one of {', '.join(CONFIGURATIONS)}, not {name!r}")
    if not budget > 0:
        raise InputError(f"budget must be a positive number, not {budget}")
    spacings, shapes = merged["spacings"], merged["shapes_after_crop"]
    target = target_spacing(spacings, shapes)
    new_shapes = [new_shape(shape, spacing, target) for spacing, shape in zip(spacings, shapes)]
    median_shape = np.median(np.asarray(new_shapes, dtype=np.float64), axis=0)
    n_training = merged["n_cases"] if n_training is None else n_training
    dataset_voxels = float(np.prod(median_shape, dtype=np.float64) * n_training)
    if name == "3d_fullres":
        if median_shape[0] == 1:
            raise InputError("the images are 2D (one slice): plan the '2d' configuration instead")
        spacing, shape, dim = target, median_shape, 3
    else:
        spacing, shape, dim = target[1:], median_shape[1:], 2
    n_classes = parse_labels(merged["labels"], merged.get("regions_class_order")).n_outputs
    patch, network, estimate = plan_patch_and_network(spacing, shape, n_classes, budget)
    schemes, use_mask = normalization_schemes(merged["channel_names"], merged["median_relative_size_after_cropping"])
    return ConfigurationPlan(
        name=name,
        spacing=[float(s) for s in spacing],
        patch_size=[int(p) for p in patch],
        median_image_size_in_voxels=[float(s) for s in shape],
        batch_size=batch_size_for(estimate, patch, dataset_voxels, dim, budget),
        normalization_schemes=schemes,
        use_mask_for_norm=use_mask,
        network=network,
        resampling_separate_z_anisotropy_threshold=ANISOTROPY_THRESHOLD,
    )


def with_patch_size(config: ConfigurationPlan, patch: Sequence[int], n_classes: int,
                    n_training: int, budget: float) -> ConfigurationPlan:
    """The configuration re-planned for a given patch size (topology and batch size follow)."""
    patch = [int(p) for p in patch]
    if len(patch) != config.ndim or any(p < 1 for p in patch):
        raise InputError(f"configuration.patch_size needs {config.ndim} positive integers, got {patch}")
    padded, network = network_for_patch(config.spacing, patch, config.ndim)
    if padded != patch:
        raise InputError(
            f"configuration.patch_size {','.join(map(str, patch))} is not divisible by the network's pooling; "
            f"use {','.join(map(str, padded))}"
        )
    estimate = estimate_feature_map_voxels(patch, network.strides, network.features_per_stage, n_classes)
    check_compute(patch, estimate, MIN_BATCH_SIZE, config.ndim, "configuration.patch_size")
    dataset_voxels = float(np.prod(config.median_image_size_in_voxels, dtype=np.float64) * n_training)
    new = deepcopy(config)
    new.patch_size = patch
    new.network = network
    new.batch_size = batch_size_for(estimate, patch, dataset_voxels, config.ndim, budget)
    return new



def with_batch_size(config: ConfigurationPlan, batch_size: int, n_classes: int) -> ConfigurationPlan:
    """The configuration with a hand-set batch size (checked against MAX_OVERRIDE_BUDGET_GB)."""
    network = config.network
    estimate = estimate_feature_map_voxels(config.patch_size, network.strides, network.features_per_stage, n_classes)
    check_compute(config.patch_size, estimate, batch_size, config.ndim, "configuration.batch_size")
    new = deepcopy(config)
    new.batch_size = int(batch_size)
    return new



# "<configuration>@<site>": the name of a configuration planned for one site only.
SITE_CONFIGURATION_SEPARATOR = "@"


def site_configurations(
    fingerprints: Sequence[dict[str, Any]],
    fingerprint_names: Sequence[str] | None,
    configuration: str,
    budget: float,
    config_over: Mapping[str, Any],
    n_classes: int,
) -> dict[str, ConfigurationPlan]:
    """One configuration per site, "<configuration>@<site>", planned from that site's fingerprint alone.

    What nnU-Net would plan if the site trained on its own: its spacing, patch size, depth,
    kernels, batch size (from its own case count) and normalisation (mask use from its own
    crop ratio). CTNormalization statistics are NOT per site: preprocessing takes them from
    the merged fingerprint (plans.fingerprint), because Hounsfield units are physical and
    the shared first encoder stage must see the same intensity mapping at every site.
    `--set configuration.*` overrides apply to every site's configuration.
    """
    names = list(fingerprint_names) if fingerprint_names is not None else [None] * len(fingerprints)
    out: dict[str, ConfigurationPlan] = {}
    for fp, name in sorted(zip(fingerprints, names), key=lambda pair: pair[0]["site"]):
        own = merge_fingerprints([fp], None if name is None else [name])
        config = plan_configuration(own, configuration, budget, n_training=fp["n_cases"])
        if "patch_size" in config_over:
            config = with_patch_size(config, config_over["patch_size"], n_classes, fp["n_cases"], budget)
        if "batch_size" in config_over:
            config = with_batch_size(config, config_over["batch_size"], n_classes)
        config.name = f"{configuration}{SITE_CONFIGURATION_SEPARATOR}{fp['site']}"
        out[config.name] = config
    return out



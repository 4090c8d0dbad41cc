"""nnU-Net's experiment planning (plain conv U-Net), from a merged federated fingerprint.

The rules are nnU-Net v2's ExperimentPlanner, with the reason for each constant beside it:
target spacing = per-axis median spacing with the anisotropy rule; an initial patch with the
aspect ratio of 1/spacing, clipped to the median image shape; the pooling topology of
get_pool_and_conv_props; the patch shrunk one axis at a time until the estimated activation
memory fits the budget; batch size grown into any budget left, but never covering more than
5 % of the dataset; normalisation per channel name.

Differences from nnU-Net, on purpose:
- The budget is a number (`budget`, in nnU-Net's "GPU memory target in GB": 8 reproduces
  nnU-Net's default plans) instead of a GPU query; fedseg's default is sized for training on
  a CPU. The memory estimate counts feature-map voxels exactly as nnU-Net's
  `compute_conv_feature_map_size` does, without instantiating a network (no torch here).
- The number of stages is capped (6 in 3D, 7 in 2D): deeper networks only pay off for
  patches far larger than a CPU budget allows.
- No axis transpose: arrays stay (z, y, x) and the 2d configuration always takes (y, x)
  slices; nnU-Net moves the largest-spacing axis first, which is the same for the common
  case of a thick-slice z axis.
- numTraining is the sum over all sites, so every site derives the same plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import fields
from typing import Any

import numpy as np

from fedseg.errors import InputError
from fedseg.planning.merge import merge_fingerprints
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec, TrainingSpec

# A spacing more than 3x the others makes a dataset anisotropic (nnU-Net's ANISO_THRESHOLD);
# it also decides where resampling treats z separately.
ANISOTROPY_THRESHOLD = 3.0
# Smallest edge of a bottleneck feature map: pooling below 4 voxels leaves no context to learn.
FEATUREMAP_MIN_EDGE = 4
# nnU-Net's feature widths: 32 at full resolution, doubled per stage, capped to bound memory.
BASE_FEATURES = 32
MAX_FEATURES = {3: 320, 2: 512}
# Stage cap (see module docstring): 5 poolings in 3D reach a 4-voxel bottleneck from 128.
MAX_STAGES = {3: 6, 2: 7}
# Two convolutions per stage in encoder and decoder (nnU-Net's plain U-Net).
CONVS_PER_STAGE = 2
# nnU-Net's reference activation counts for an 8 GB GPU at its reference batch sizes
# (UNet_reference_val_3d/2d; "set to reproduce nnU-Net v1's configurations").
REFERENCE_FEATURE_MAP_VOXELS = {3: 560_000_000, 2: 85_000_000}
REFERENCE_BATCH_SIZE = {3: 2, 2: 12}
REFERENCE_BUDGET_GB = 8.0
# A batch of one sample would make instance statistics and the loss too noisy.
MIN_BATCH_SIZE = 2
# A batch never covers more than 5 % of the dataset's voxels (nnU-Net's overfitting precaution).
MAX_DATASET_COVERED = 0.05
# fedseg's default budget, in nnU-Net GB-equivalents: about a tenth of nnU-Net's 8 GB, so a
# 128x128x96 dataset at 1 mm gets a ~64^3 patch and a 32^3 dataset its whole image — sizes a
# CPU trains at a few seconds per iteration.
DEFAULT_BUDGET = 0.8
# Initial patch volume before shrinking (nnU-Net: 256^3 in 3D, 2048^2 in 2D), then clipped to
# the median shape: certainly larger than any budget needs.
INITIAL_PATCH_VOXELS = {3: 256 ** 3, 2: 2048 ** 2}

KNOWN_LOSSES = ("dice_ce", "dice_focal", "bce")   # the losses fedseg.training.losses.make_loss builds
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


# -- target spacing and shapes --------------------------------------------------------------

def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Median spacing per axis; for anisotropic data the 10th percentile along the coarse axis.

    A thick-slice axis (spacing > 3x the others) with few voxels (3x fewer than the others)
    would be interpolated badly at the median spacing; nnU-Net takes the 10th percentile of
    that axis' spacings instead, but never finer than the other axes.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(other_spacings)
    aniso_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min(other_sizes)
    if aniso_spacing and aniso_voxels:
        axis_target = np.percentile(spacings[:, worst], 10)
        if axis_target < max(other_spacings):
            # never finer than the other axes (+1e-5 keeps it the unique coarsest, as nnU-Net)
            axis_target = max(max(other_spacings), axis_target) + 1e-5
        target[worst] = axis_target
    return target


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Shape after resampling to `target`, with nnU-Net's rounding (round(spacing/target*shape))."""
    return [int(round(s / t * n)) for n, s, t in zip(shape, spacing, target)]


# -- topology -------------------------------------------------------------------------------

def pool_and_conv_props(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    min_feature_map_size: int = FEATUREMAP_MIN_EDGE,
    max_stages: int | None = None,
) -> tuple[list[int], list[list[int]], list[list[int]], list[int], list[int]]:
    """nnU-Net's get_pool_and_conv_props: (pools per axis, strides, kernel sizes, patch, divisor).

    Each step pools (stride 2) every axis that is still at least 2x the minimum feature map
    and whose current spacing is within 2x of the finest; a lone axis pools only while at
    least 3x the minimum. An axis gets 3-wide kernels once its spacing is within 2x of the
    finest (1 before: too anisotropic to convolve across). The bottleneck always uses 3s.
    The patch is padded up to a multiple of 2^pools per axis. `max_stages` caps the depth.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]
    strides = [[1] * dim]
    kernels: list[list[int]] = []
    pools_per_axis = [0] * dim
    kernel = [1] * dim
    while max_stages is None or len(strides) < max_stages:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        finest_valid = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest_valid < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        finest = min(current_spacing)
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / finest < 2:
                kernel[d] = 3
        step = [1] * dim
        for v in valid:
            step[v] = 2
            pools_per_axis[v] += 1
            current_spacing[v] *= 2
            current_size[v] = math.ceil(current_size[v] / 2)
        strides.append(step)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2 ** p for p in pools_per_axis]
    padded = [int(math.ceil(float(s) / d) * d) for s, d in zip(patch_size, divisor)]
    return pools_per_axis, strides, kernels, padded, divisor


def features_per_stage(n_stages: int, dim: int) -> list[int]:
    return [min(MAX_FEATURES[dim], BASE_FEATURES * 2 ** i) for i in range(n_stages)]


def estimate_feature_map_voxels(
    patch_size: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int], n_classes: int
) -> int:
    """Activation size of one sample: nnU-Net's PlainConvUNet.compute_conv_feature_map_size.

    Sum over every convolution output (encoder, decoder, transposed convolutions and the
    final segmentation layer) of features x voxels. Proportional to training memory and
    compute per sample; it is what the budget is measured against.
    """
    n_stages = len(strides)
    total = 0
    size = list(patch_size)
    skip_sizes = []
    for s in range(n_stages):
        size = [i // j for i, j in zip(size, strides[s])]
        total += CONVS_PER_STAGE * features[s] * math.prod(size)
        if s < n_stages - 1:
            skip_sizes.append(size)
    for s in range(n_stages - 1):
        skip = skip_sizes[-(s + 1)]
        voxels = math.prod(skip)
        width = features[-(s + 2)]
        total += CONVS_PER_STAGE * width * voxels   # decoder convolutions
        total += width * voxels                     # transposed convolution
        if s == n_stages - 2:
            total += n_classes * voxels             # segmentation output
    return total


def _network(spacing, patch, dim) -> tuple[list[int], NetworkSpec]:
    _, strides, kernels, patch, _ = pool_and_conv_props(spacing, patch, max_stages=MAX_STAGES[dim])
    n_stages = len(strides)
    return patch, NetworkSpec(
        n_stages=n_stages,
        features_per_stage=features_per_stage(n_stages, dim),
        kernel_sizes=kernels,
        strides=strides,
        n_conv_per_stage=[CONVS_PER_STAGE] * n_stages,
        n_conv_per_stage_decoder=[CONVS_PER_STAGE] * (n_stages - 1),
    )


def plan_patch_and_network(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    n_classes: int,
    budget: float = DEFAULT_BUDGET,
) -> tuple[list[int], NetworkSpec, int]:
    """(patch size, network, estimated feature-map voxels) within `budget` (nnU-Net GB-equivalents)."""
    dim = len(spacing)
    reference = REFERENCE_FEATURE_MAP_VOXELS[dim] * budget / REFERENCE_BUDGET_GB
    ref_bs = REFERENCE_BATCH_SIZE[dim]
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    initial = [round(float(i)) for i in inverse * (INITIAL_PATCH_VOXELS[dim] / np.prod(inverse)) ** (1 / dim)]
    # Clipped to the median shape, kept fractional as nnU-Net does (the padding rounds up).
    initial = [min(float(i), float(j)) for i, j in zip(initial, median_shape)]
    patch, network = _network(spacing, initial, dim)
    estimate = estimate_feature_map_voxels(patch, network.strides, network.features_per_stage, n_classes)
    # The reference values hold for the reference batch size; fedseg needs at least 2 per batch.
    while estimate / ref_bs * MIN_BATCH_SIZE > reference:
        # Shrink the axis that is largest relative to the median shape (keeps the aspect ratio).
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = int(np.argsort(ratios, kind="stable")[-1])
        _, _, _, _, divisor = pool_and_conv_props(spacing, patch, max_stages=MAX_STAGES[dim])
        trial = list(patch)
        trial[axis] -= divisor[axis]
        # Recompute the divisor for the smaller patch (it may need fewer poolings), so no
        # valid size is skipped (nnU-Net's two-step reduction).
        _, _, _, _, divisor = pool_and_conv_props(spacing, trial, max_stages=MAX_STAGES[dim])
        smaller = list(patch)
        smaller[axis] -= divisor[axis]
        if trial[axis] < 1:
            raise InputError(f"budget {budget} is too small for any patch (axis {axis} would vanish)")
        new_patch, network = _network(spacing, smaller, dim)
        if new_patch[axis] >= patch[axis]:
            # padding undid the reduction: take the full first step instead (guarantees progress)
            new_patch, network = _network(spacing, trial, dim)
        patch = new_patch
        estimate = estimate_feature_map_voxels(patch, network.strides, network.features_per_stage, n_classes)
    return patch, network, estimate


def batch_size_for(estimate: int, patch: Sequence[int], dataset_voxels: float, dim: int, budget: float) -> int:
    """Grow the batch into the budget left; cap it at 5 % of the dataset; at least 2."""
    reference = REFERENCE_FEATURE_MAP_VOXELS[dim] * budget / REFERENCE_BUDGET_GB
    batch = round(reference / estimate * REFERENCE_BATCH_SIZE[dim])
    covering_cap = round(dataset_voxels * MAX_DATASET_COVERED / float(np.prod(patch, dtype=np.float64)))
    return int(max(min(batch, covering_cap), MIN_BATCH_SIZE))


def normalization_schemes(channel_names: Mapping[str, str], median_relative_size: float) -> tuple[list[str], list[bool]]:
    """Per channel: scheme by channel name (CT -> CTNormalization, else z-score), and mask use."""
    ordered = [channel_names[k] for k in sorted(channel_names, key=int)]
    schemes = [_SCHEME_BY_CHANNEL_NAME.get(name.strip().casefold(), "ZScoreNormalization") for name in ordered]
    use_mask = [median_relative_size < USE_MASK_RELATIVE_SIZE and s in _SCHEMES_USING_MASK for s in schemes]
    return schemes, use_mask


# -- configurations ---------------------------------------------------------------------------

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
    n_classes = len(merged["labels"])
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
    padded, network = _network(config.spacing, patch, config.ndim)
    if padded != patch:
        raise InputError(
            f"configuration.patch_size {','.join(map(str, patch))} is not divisible by the network's pooling; "
            f"use {','.join(map(str, padded))}"
        )
    estimate = estimate_feature_map_voxels(patch, network.strides, network.features_per_stage, n_classes)
    dataset_voxels = float(np.prod(config.median_image_size_in_voxels, dtype=np.float64) * n_training)
    new = deepcopy(config)
    new.patch_size = patch
    new.network = network
    new.batch_size = batch_size_for(estimate, patch, dataset_voxels, config.ndim, budget)
    return new


# -- overrides ------------------------------------------------------------------------------

_TRAINING_FIELDS = {f.name: f for f in fields(TrainingSpec)}


def parse_value(raw: Any) -> Any:
    """A --set value: JSON when it parses ("3" -> 3, "[1,2]" -> list, "true" -> True), else the string."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _training_value(key: str, value: Any) -> Any:
    default = getattr(TrainingSpec(), key)
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"training.{key} must be an integer, not {value!r}")
        if value < 1:
            raise InputError(f"training.{key} must be at least 1, not {value}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"training.{key} must be a number, not {value!r}")
        value = float(value)
        if key in ("oversample_foreground_percent", "val_fraction", "momentum") and not 0.0 <= value <= 1.0:
            raise InputError(f"training.{key} must be within [0, 1], not {value}")
        if key in ("initial_lr",) and value <= 0:
            raise InputError(f"training.{key} must be positive, not {value}")
        if key == "weight_decay" and value < 0:
            raise InputError(f"training.{key} must not be negative, not {value}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise InputError(f"training.{key} must be a string, not {value!r}")
        if key == "loss" and value not in KNOWN_LOSSES:
            raise InputError(f"training.loss must be one of {', '.join(KNOWN_LOSSES)}, not {value!r}")
    return value


def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict, dict, dict, int | None]:
    """(training, configuration, strategy params, seed) from dotted --set keys."""
    training: dict[str, Any] = {}
    configuration: dict[str, Any] = {}
    strategy: dict[str, Any] = {}
    seed = None
    for key in sorted(overrides):
        value = parse_value(overrides[key])
        if not isinstance(key, str) or not key.strip():
            raise InputError(f"--set needs key=value, got key {key!r}")
        key = key.strip()
        if key.startswith("training."):
            name = key[len("training."):]
            if name not in _TRAINING_FIELDS:
                raise InputError(f"unknown --set key {key!r} (training keys: {', '.join(sorted(_TRAINING_FIELDS))})")
            training[name] = _training_value(name, value)
        elif key.startswith("configuration."):
            name = key[len("configuration."):]
            if name == "patch_size":
                if isinstance(value, (int, str)):
                    value = [v for v in str(value).split(",") if v.strip()]
                try:
                    value = [int(str(v).strip()) for v in value]
                except (TypeError, ValueError):
                    raise InputError(f"configuration.patch_size must be integers like 64,64,64, not {overrides[key]!r}") from None
            elif name == "batch_size":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InputError(f"configuration.batch_size must be a positive integer, not {value!r}")
            elif name == "per_site":
                if not isinstance(value, bool):
                    raise InputError(f"configuration.per_site must be true or false, not {value!r}")
            else:
                raise InputError(f"unknown --set key {key!r} (configuration keys: batch_size, patch_size, per_site)")
            configuration[name] = value
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"seed must be an integer, not {value!r}")
            seed = value
        else:
            name = key[len("strategy."):] if key.startswith("strategy.") else key
            if not name:
                raise InputError(f"--set key {key!r} names no strategy parameter")
            strategy[name] = value
    return training, configuration, strategy, seed


# -- the plan -------------------------------------------------------------------------------

def strategy_training_defaults(strategy: str) -> dict[str, Any]:
    """Training values a strategy plans by default (its class's `training_defaults`), e.g.
    flames' Dice + Focal loss; `--set training.KEY=...` still wins. Unknown names: none."""
    from fedseg.federation.strategies import get_strategy, strategy_names

    if strategy not in strategy_names():
        return {}
    defaults = dict(getattr(get_strategy(strategy), "training_defaults", None) or {})
    return {key: _training_value(key, value) for key, value in defaults.items()}


def strategy_requires_same_channels(strategy: str, params: Mapping[str, Any]) -> bool:
    """Whether every site must hold the same channels (the strategy's `requires_same_channels`);
    unknown names: yes (the usual case)."""
    from fedseg.federation.strategies import get_strategy, strategy_names

    if strategy not in strategy_names():
        return True
    return bool(get_strategy(strategy).requires_same_channels(params))


def strategy_plans_per_site(strategy: str) -> bool:
    """Whether a strategy's sites each train a network planned from their own fingerprint
    (its class's `plans_per_site`, e.g. asymfedavg). Unknown names: no."""
    from fedseg.federation.strategies import get_strategy, strategy_names

    return strategy in strategy_names() and bool(getattr(get_strategy(strategy), "plans_per_site", False))


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
            config.batch_size = config_over["batch_size"]
        config.name = f"{configuration}{SITE_CONFIGURATION_SEPARATOR}{fp['site']}"
        out[config.name] = config
    return out


def make_plans(
    fingerprints: Sequence[dict[str, Any]],
    strategy: str = "fedavg",
    strategy_params: Mapping[str, Any] | None = None,
    configuration: str | None = "3d_fullres",
    budget: float | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 1234,
    fingerprint_names: Sequence[str] | None = None,
    require_same_channels: bool | None = None,
    per_site: bool | None = None,
) -> Plans:
    """Merge the sites' fingerprints and plan the federation.

    `budget`: compute budget in nnU-Net "GPU memory target" GB-equivalents (8 = nnU-Net's
    default plans; default DEFAULT_BUDGET, sized for a CPU). `configuration` "3d_fullres"
    or "2d"; datasets of 2D images always get "2d" (a 3D network on one slice is no 3D
    network); None picks "3d_fullres" for 3D images. `overrides` are `--set` keys:
    training.<field>, configuration.patch_size / configuration.batch_size, seed, and
    strategy.<key> or any other key as a strategy parameter; string values are parsed as
    JSON when they parse. The plan does not depend on the order of `fingerprints`.
    `require_same_channels` None asks the strategy: mix-modal strategies accept sites
    holding different subsets of channels, merged by name into the plan's channel list.
    `per_site`: plan one configuration per site from that site's own fingerprint (see
    `site_configurations`); None = as the strategy asks (its class's `plans_per_site`).
    """
    if not isinstance(strategy, str) or not strategy:
        raise InputError("strategy name must be a non-empty string")
    budget = DEFAULT_BUDGET if budget is None else float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise InputError(f"--budget must be a positive number, not {budget}")
    training_over, config_over, strategy_over, seed_over = _split_overrides(overrides or {})
    # `--set configuration.per_site=true`: e.g. local-only training on each site's own plan,
    # the baseline a hospital training nnU-Net alone would have.
    per_site = config_over.pop("per_site", per_site)
    if require_same_channels is None:
        # mix-modal strategies (mixmfl, fedavg with missing=zero) take sites holding different channels
        require_same_channels = strategy_requires_same_channels(strategy, {**dict(strategy_params or {}), **strategy_over})
    merged = merge_fingerprints(fingerprints, fingerprint_names, require_same_channels=require_same_channels)

    if merged["image_dim"] == 2:
        configuration = "2d"
    elif configuration is None:
        configuration = "3d_fullres"
    config = plan_configuration(merged, configuration, budget)
    n_classes = len(merged["labels"])
    if "patch_size" in config_over:
        config = with_patch_size(config, config_over["patch_size"], n_classes, merged["n_cases"], budget)
    if "batch_size" in config_over:
        config.batch_size = config_over["batch_size"]

    configurations = {config.name: config}
    default_configuration = config.name
    site_configs: dict[str, str] = {}
    if strategy_plans_per_site(strategy) if per_site is None else per_site:
        configurations = site_configurations(fingerprints, fingerprint_names, configuration, budget, config_over, n_classes)
        site_configs = {c.split(SITE_CONFIGURATION_SEPARATOR, 1)[1]: c for c in configurations}
        default_configuration = min(configurations)

    training = TrainingSpec(**{**strategy_training_defaults(strategy), **training_over})
    params = {**dict(strategy_params or {}), **strategy_over}
    names = sorted({fp.get("dataset_name") or fp["site"] for fp in fingerprints})
    sites = {
        name: SiteInfo(modality=info["modality"], channels=list(info["channel_names"].values()), n_cases=info["n_cases"],
                       configuration=site_configs.get(name))
        for name, info in merged["sites"].items()
    }
    return Plans(
        dataset_name="+".join(names),
        channel_names=dict(merged["channel_names"]),
        labels=dict(merged["labels"]),
        file_ending=merged["file_ending"],
        fingerprint=merged,
        sites=sites,
        strategy=StrategySpec(name=strategy, params=params),
        configurations=configurations,
        default_configuration=default_configuration,
        training=training,
        seed=int(seed if seed_over is None else seed_over),
        extra={"planning": {"budget": budget, "planner": "nnU-Net ExperimentPlanner rules (fedseg)"}},
    )

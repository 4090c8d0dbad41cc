"""nnU-Net's experiment planning rules for the network: target spacing, pooling topology, and
the patch shrunk until one sample's activations fit the budget (fedseg.planning.budget).

Differences from nnU-Net, on purpose (see also fedseg.planning.planner):
- The number of stages is capped (6 in 3D, 7 in 2D): deeper networks only pay off for
  patches far larger than a CPU budget allows.
- No axis transpose: arrays stay (z, y, x) and the 2d configuration always takes (y, x)
  slices; nnU-Net moves the largest-spacing axis first, which is the same for the common
  case of a thick-slice z axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedseg.errors import InputError
from fedseg.planning.budget import (
    CONVS_PER_STAGE,
    DEFAULT_BUDGET,
    MIN_BATCH_SIZE,
    REFERENCE_BATCH_SIZE,
    REFERENCE_BUDGET_GB,
    REFERENCE_FEATURE_MAP_VOXELS,
    estimate_feature_map_voxels,
)
from fedseg.planning.plans import NetworkSpec

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
# Initial patch volume before shrinking (nnU-Net: 256^3 in 3D, 2048^2 in 2D), then clipped to
# the median shape: certainly larger than any budget needs.
INITIAL_PATCH_VOXELS = {3: 256 ** 3, 2: 2048 ** 2}


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


def network_for_patch(spacing: Sequence[float], patch: Sequence[float], dim: int) -> tuple[list[int], NetworkSpec]:
    """(padded patch, plain U-Net) for a patch: nnU-Net's topology, its widths, two convolutions per stage."""
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
    patch, network = network_for_patch(spacing, initial, dim)
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
        new_patch, network = network_for_patch(spacing, smaller, dim)
        if new_patch[axis] >= patch[axis]:
            # padding undid the reduction: take the full first step instead (guarantees progress)
            new_patch, network = network_for_patch(spacing, trial, dim)
        patch = new_patch
        estimate = estimate_feature_map_voxels(patch, network.strides, network.features_per_stage, n_classes)
    return patch, network, estimate



"""The compute budget of a plan: nnU-Net's activation estimate of one sample, the batch size
grown into the budget left, and the bound on hand-set patch and batch sizes.

The budget is a number in nnU-Net's "GPU memory target in GB" (8 reproduces nnU-Net's
default plans) instead of a GPU query; the memory estimate counts feature-map voxels exactly
as nnU-Net's `compute_conv_feature_map_size` does, without instantiating a network (no torch
here). Imports no plan type at run time, so the plan file's own checks can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedseg.errors import InputError

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
# A patch or batch size set by hand (`--set configuration.*`) may exceed the planning budget
# (the user may train on a larger GPU), but not what the largest single accelerator of today
# holds (141 GB): beyond that, training could only end in an out-of-memory error.
MAX_OVERRIDE_BUDGET_GB = 160.0


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



def batch_size_for(estimate: int, patch: Sequence[int], dataset_voxels: float, dim: int, budget: float) -> int:
    """Grow the batch into the budget left; cap it at 5 % of the dataset; at least 2."""
    reference = REFERENCE_FEATURE_MAP_VOXELS[dim] * budget / REFERENCE_BUDGET_GB
    batch = round(reference / estimate * REFERENCE_BATCH_SIZE[dim])
    covering_cap = round(dataset_voxels * MAX_DATASET_COVERED / float(np.prod(patch, dtype=np.float64)))
    return int(max(min(batch, covering_cap), MIN_BATCH_SIZE))



def memory_estimate_gb(estimate: int, batch_size: int, dim: int) -> float:
    """nnU-Net's GPU-memory estimate (GB) for a batch, from one sample's feature-map voxels."""
    return estimate * batch_size / REFERENCE_BATCH_SIZE[dim] * REFERENCE_BUDGET_GB / REFERENCE_FEATURE_MAP_VOXELS[dim]


def check_compute(patch: Sequence[int], estimate: int, batch_size: int, dim: int, what: str, source: str = "--set ") -> None:
    """Refuse a patch and batch size that no accelerator could train (MAX_OVERRIDE_BUDGET_GB)."""
    needed = memory_estimate_gb(estimate, batch_size, dim)
    if needed > MAX_OVERRIDE_BUDGET_GB:
        raise InputError(
            f"{source}{what}: patch {','.join(map(str, patch))} with batch size {batch_size} needs about "
            f"{needed:,.0f} GB of accelerator memory (nnU-Net's estimate), more than {MAX_OVERRIDE_BUDGET_GB:g} GB; "
            "choose a smaller patch, batch size or --budget"
        )



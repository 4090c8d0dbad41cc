"""Segmentation losses as nnU-Net defines them, plus FLAMES' Dice + Focal and FedFMS' BCE.

Targets are class-index maps of shape (b, 1, *spatial) (float or int). Voxels marked -1
(outside the nonzero mask after cropping) count as background, as nnU-Net does when the
dataset has no ignore label (its RemoveLabelTransform(-1, 0)).

Region-based labels (fedseg.data.labels) train one sigmoid output per region with nnU-Net's
DC_and_BCE_loss; the region masks are made from the class-index target inside the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedseg.errors import InputError

# nnU-Net's Dice smoothing: keeps empty classes at Dice 1 (0/0 -> smooth/smooth) without
# noticeably biasing non-empty ones.
DICE_SMOOTH = 1e-5
# FLAMES' loss mix and focal parameters.
FOCAL_MIX = (0.3, 0.7)     # (Dice weight, Focal weight)
FOCAL_ALPHA = 0.8
FOCAL_GAMMA = 2.0

LOSS_NAMES = ("dice_ce", "dice_focal", "bce")


def _class_indices(target: torch.Tensor) -> torch.Tensor:
    """(b, 1, ...) or (b, ...) target -> (b, ...) long class indices with -1 mapped to background."""
    if target.ndim >= 2 and target.shape[1] == 1:
        target = target[:, 0]
    target = target.long()
    return target.clamp_min(0)


class MemoryEfficientSoftDiceLoss(nn.Module):
    """nnU-Net's soft Dice (batch_dice off, background excluded): returns the NEGATIVE mean Dice.

    Dice per sample and foreground class over the spatial axes, then averaged, so a perfect
    prediction scores -1 (nnU-Net's convention; the loss goes down as Dice goes up).
    """

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = DICE_SMOOTH) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            idx = _class_indices(target)
            onehot = torch.zeros(probs.shape, device=probs.device, dtype=torch.bool)
            onehot.scatter_(1, idx[:, None], True)
            if not self.do_bg:
                onehot = onehot[:, 1:]
            sum_gt = onehot.sum(axes)
        if not self.do_bg:
            probs = probs[:, 1:]
        return -soft_dice(probs, onehot, sum_gt, self.batch_dice, self.smooth)


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, sum_gt: torch.Tensor, batch_dice: bool, smooth: float) -> torch.Tensor:
    """Mean soft Dice of (b, K, ...) probabilities against (b, K, ...) masks (per sample and
    channel, or pooled over the batch with `batch_dice`)."""
    axes = tuple(range(2, probs.ndim))
    intersect = (probs * onehot).sum(axes)
    sum_pred = probs.sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + smooth) / torch.clip(sum_gt + sum_pred + smooth, 1e-8)
    return dc.mean()


class DiceBCERegionLoss(nn.Module):
    """nnU-Net's DC_and_BCE_loss for region-based labels: BCE on the logits + soft Dice on
    their sigmoids, weights 1:1, every output a foreground region (so no background to drop).

    `region_class_indices[r]`: the class indices of the target that make up region r.
    """

    def __init__(self, region_class_indices: Sequence[Sequence[int]], smooth: float = DICE_SMOOTH) -> None:
        super().__init__()
        self.region_class_indices = [list(r) for r in region_class_indices]
        self.smooth = smooth

    def region_targets(self, target: torch.Tensor) -> torch.Tensor:
        """(b, 1, ...) class indices -> (b, R, ...) float region masks."""
        idx = _class_indices(target)
        masks = [torch.isin(idx, torch.tensor(r, device=idx.device)) for r in self.region_class_indices]
        return torch.stack(masks, 1).float()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != len(self.region_class_indices):
            raise ValueError(f"{logits.shape[1]} outputs for {len(self.region_class_indices)} regions")
        with torch.no_grad():
            regions = self.region_targets(target)
            sum_gt = regions.sum(tuple(range(2, regions.ndim)))
        bce = F.binary_cross_entropy_with_logits(logits, regions)
        return bce - soft_dice(torch.sigmoid(logits), regions, sum_gt, False, self.smooth)


class CrossEntropy(nn.Module):
    """Mean cross-entropy over all voxels (nnU-Net's RobustCrossEntropyLoss without an ignore label)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, _class_indices(target))


class FocalLoss(nn.Module):
    """Multi-class focal loss: mean over voxels of -a_t (1 - p_t)^gamma log p_t.

    Choice of a_t for more than two classes: `alpha` weighs every foreground voxel and
    `1 - alpha` every background voxel. This is the binary focal loss's rule (Lin et al.,
    alpha on the positive class) lifted to "foreground vs background", which is what FLAMES'
    alpha = 0.8 intends: up-weight the rare foreground.
    """

    def __init__(self, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        idx = _class_indices(target)
        log_p = torch.log_softmax(logits, dim=1)
        log_pt = log_p.gather(1, idx[:, None])[:, 0]
        pt = log_pt.exp()
        alpha_t = torch.where(idx > 0, self.alpha, 1.0 - self.alpha).to(logits.dtype)
        return (-alpha_t * (1.0 - pt) ** self.gamma * log_pt).mean()


class OneHotBCE(nn.Module):
    """FedFMS' loss: binary cross-entropy of every class's logit (sigmoid) against its one-hot
    mask, mean over classes and voxels (BCEWithLogits on SAM's multi-class head)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(_class_indices(target), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, onehot)


class DiceCELoss(nn.Module):
    """nnU-Net's DC_and_CE_loss: CE + soft Dice, weights 1:1."""

    def __init__(self, weight_ce: float = 1.0, weight_dice: float = 1.0) -> None:
        super().__init__()
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.ce = CrossEntropy()
        self.dice = MemoryEfficientSoftDiceLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight_ce * self.ce(logits, target) + self.weight_dice * self.dice(logits, target)


class DiceFocalLoss(nn.Module):
    """FLAMES: 0.3 * soft Dice + 0.7 * focal (alpha 0.8, gamma 2)."""

    def __init__(self, weight_dice: float = FOCAL_MIX[0], weight_focal: float = FOCAL_MIX[1]) -> None:
        super().__init__()
        self.weight_dice = weight_dice
        self.weight_focal = weight_focal
        self.dice = MemoryEfficientSoftDiceLoss()
        self.focal = FocalLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight_dice * self.dice(logits, target) + self.weight_focal * self.focal(logits, target)


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's rule: 1/2^i, the lowest resolution dropped (weight 0), normalised to sum 1."""
    if n_outputs < 1:
        raise ValueError("need at least one output")
    if n_outputs == 1:
        return [1.0]
    w = np.array([1.0 / (2**i) for i in range(n_outputs)])
    w[-1] = 0.0
    return (w / w.sum()).tolist()


class DeepSupervisionWrapper(nn.Module):
    """Weighted sum of a loss over (output, target) pairs, highest resolution first."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(self.weights) or len(targets) != len(self.weights):
            raise ValueError(
                f"deep supervision expects {len(self.weights)} outputs and targets, got {len(outputs)} and {len(targets)}"
            )
        total = outputs[0].new_zeros(())
        for w, out, tgt in zip(self.weights, outputs, targets):
            if w != 0.0:  # skip the dropped lowest resolution entirely (saves its Dice/CE)
                total = total + w * self.loss(out, tgt)
        return total


def make_loss(
    name: str,
    deep_supervision_scales: Sequence[Sequence[float]] | None = None,
    region_class_indices: Sequence[Sequence[int]] | None = None,
) -> nn.Module:
    """The training loss by plan name ("dice_ce" | "dice_focal" | "bce").

    With `deep_supervision_scales` (one entry per network output) the loss takes lists of
    outputs and targets; without, one output tensor and one target tensor.
    With `region_class_indices` (region-based labels) "dice_ce" is nnU-Net's Dice + BCE on
    the regions; "dice_focal" has no region form and is refused.
    """
    if region_class_indices is not None:
        if name != "dice_ce":
            raise InputError(f"loss {name!r} is not defined for region-based labels (use training.loss=dice_ce)")
        base: nn.Module = DiceBCERegionLoss(region_class_indices)
    elif name == "dice_ce":
        base: nn.Module = DiceCELoss()
    elif name == "dice_focal":
        base = DiceFocalLoss()
    elif name == "bce":
        base = OneHotBCE()
    else:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSS_NAMES)})")
    if deep_supervision_scales is None:
        return base
    return DeepSupervisionWrapper(base, deep_supervision_weights(len(deep_supervision_scales)))


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """nnU-Net's scales of the network outputs relative to the patch: 1/cumprod(strides), bottleneck dropped."""
    cum = np.cumprod(np.vstack([np.asarray(s, dtype=float) for s in strides]), axis=0)
    return [list(map(float, 1.0 / row)) for row in cum][:-1]

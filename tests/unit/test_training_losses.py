"""Losses: nnU-Net's soft Dice (negative), CE, focal, Dice+Focal, deep supervision weighting."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from fedseg.training.losses import (
    CrossEntropy,
    DeepSupervisionWrapper,
    DiceCELoss,
    DiceFocalLoss,
    FocalLoss,
    MemoryEfficientSoftDiceLoss,
    deep_supervision_scales,
    deep_supervision_weights,
    make_loss,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and avoids threads spinning on a shared CI core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def onehot_logits(target: torch.Tensor, n_classes: int, scale: float = 50.0) -> torch.Tensor:
    """Logits that put (almost) all probability on the target class. target: (b, 1, ...)."""
    return scale * F.one_hot(target[:, 0].long(), n_classes).movedim(-1, 1).float()


def random_target(shape=(2, 1, 6, 6, 6), n_classes=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_classes, shape, generator=g).float()


def test_perfect_prediction_gives_dice_loss_minus_one():
    target = random_target()
    loss = MemoryEfficientSoftDiceLoss()(onehot_logits(target, 3), target)
    assert loss.item() == pytest.approx(-1.0, abs=1e-5)


def test_dice_matches_hand_computation_without_background():
    # one sample, 2 classes, 4 voxels; softmax probs for class 1 known
    logits = torch.tensor([[[0.0, 0.0, 2.0, -1.0]], [[1.0, -1.0, 0.0, 0.0]]]).reshape(1, 2, 4)
    target = torch.tensor([[[1, 0, 1, 0]]]).float()
    p1 = torch.softmax(logits, 1)[0, 1]
    intersect = (p1 * torch.tensor([1.0, 0, 1, 0])).sum()
    expected = -(2 * intersect + 1e-5) / (2 + p1.sum() + 1e-5)
    assert MemoryEfficientSoftDiceLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_known_value_and_outside_mask_counts_as_background():
    target = random_target(n_classes=4)
    uniform = torch.zeros(2, 4, 6, 6, 6)
    assert CrossEntropy()(uniform, target).item() == pytest.approx(math.log(4), rel=1e-6)
    # -1 (outside the nonzero mask) is treated as background: same loss as an explicit 0
    t = random_target(n_classes=3, seed=1)
    logits = torch.randn(2, 3, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    with_minus = t.clone()
    with_minus[:, :, 0] = -1
    with_zero = t.clone()
    with_zero[:, :, 0] = 0
    for loss in (DiceCELoss(), DiceFocalLoss()):
        assert loss(logits, with_minus).item() == pytest.approx(loss(logits, with_zero).item(), rel=1e-6)


def test_dice_ce_is_sum_of_parts():
    target = random_target()
    logits = torch.randn(2, 3, 6, 6, 6, generator=torch.Generator().manual_seed(3))
    expected = CrossEntropy()(logits, target) + MemoryEfficientSoftDiceLoss()(logits, target)
    assert DiceCELoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_matches_hand_computation():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    target = torch.randint(0, 3, (2, 1, 5), generator=torch.Generator().manual_seed(5)).float()
    probs = torch.softmax(logits, 1)
    total, n = 0.0, 0
    for b in range(2):
        for v in range(5):
            c = int(target[b, 0, v])
            pt = probs[b, c, v].item()
            alpha = 0.8 if c > 0 else 0.2
            total += -alpha * (1 - pt) ** 2 * math.log(pt)
            n += 1
    assert FocalLoss()(logits, target).item() == pytest.approx(total / n, rel=1e-5)
    expected_mix = 0.3 * MemoryEfficientSoftDiceLoss()(logits, target) + 0.7 * FocalLoss()(logits, target)
    assert DiceFocalLoss()(logits, target).item() == pytest.approx(expected_mix.item(), rel=1e-6)


def test_focal_is_small_for_confident_correct_predictions():
    target = random_target()
    assert FocalLoss()(onehot_logits(target, 3, 20.0), target).item() < 1e-6


def test_deep_supervision_weights_follow_nnunet():
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_scales([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]) == [
        [1.0, 1.0, 1.0],
        [1.0, 0.5, 0.5],
        [0.5, 0.25, 0.25],
    ]


def test_deep_supervision_wrapper_weights_each_resolution():
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    loss = make_loss("dice_ce", scales)
    assert isinstance(loss, DeepSupervisionWrapper)
    outs = [torch.randn(2, 3, s, s, s, generator=torch.Generator().manual_seed(s)) for s in (8, 4, 2)]
    tgts = [random_target((2, 1, s, s, s), seed=s) for s in (8, 4, 2)]
    base = DiceCELoss()
    expected = 2 / 3 * base(outs[0], tgts[0]) + 1 / 3 * base(outs[1], tgts[1])
    assert loss(outs, tgts).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError):
        loss(outs[:2], tgts[:2])


def test_make_loss_names():
    assert isinstance(make_loss("dice_focal"), DiceFocalLoss)
    assert isinstance(make_loss("dice_ce"), DiceCELoss)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")


def test_loss_gradients_flow():
    target = random_target()
    logits = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    DiceFocalLoss()(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()

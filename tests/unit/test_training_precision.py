"""--precision: float32 by default on the CPU, bfloat16 mixed precision when asked, a bad name refused.

bfloat16 is a speed option (oneDNN's AMX kernels): what a user relies on is that the network's
convolutions really run in bfloat16, that the weights, the losses and the combined predictions
stay float32, and that the results stay close to float32's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_trainer import _start, one_torch_thread, site_root, tiny_plans  # noqa: F401  (fixtures)

from fedseg.errors import InputError
from fedseg.training.device import autocast_dtype, check_precision, float32_outputs, grad_scaler
from fedseg.training.sliding_window import sliding_window_probabilities
from fedseg.training.trainer import SiteTrainer, train_local


def test_names_and_what_each_runs_in() -> None:
    assert [check_precision(p) for p in ("auto", "fp32", "bf16")] == ["auto", "fp32", "bf16"]
    for bad in ("fp16", "BF16", "", "float32"):
        with pytest.raises(InputError, match="--precision must be auto, fp32, bf16"):
            check_precision(bad)
    assert autocast_dtype("cpu", "auto") is None            # the CPU default: plain float32, as before
    assert autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert autocast_dtype("cuda", "auto") is torch.float16  # nnU-Net's CUDA default
    assert autocast_dtype("cuda:1", "fp32") is None
    assert autocast_dtype("cuda", "bf16") is torch.bfloat16
    # float16 alone needs a GradScaler (and a GPU): none for the CPU or for bfloat16
    assert grad_scaler("cpu", "bf16") is None and grad_scaler("cpu", "auto") is None


def test_float32_outputs_converts_nested_outputs_and_leaves_the_rest() -> None:
    outputs = ([torch.ones(2, dtype=torch.bfloat16)], {"a": torch.zeros(1, dtype=torch.bfloat16), "n": 3},
               torch.arange(3))
    converted = float32_outputs(outputs)
    assert converted[0][0].dtype == torch.float32 and converted[1]["a"].dtype == torch.float32
    assert converted[1]["n"] == 3 and converted[2].dtype == torch.int64   # integers stay integers


def test_a_bf16_step_runs_its_convolutions_in_bf16_and_keeps_float32_weights(site_root: Path, tmp_path: Path) -> None:
    plans = tiny_plans(n_stages=2, features=(8, 16), iterations=2)
    net, _init = _start(plans)
    trainer = SiteTrainer(plans, "site_a", net, num_workers=0, precision="bf16")
    trainer.prepare_data(site_root, tmp_path)
    seen: list[torch.dtype] = []
    hook = net.encoder.stages[0].convs[0].conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    batches = trainer.make_batches(seed=0)
    try:
        loss = trainer.train_step(next(iter(batches)))
    finally:
        hook.remove()
        batches.close()
    assert seen == [torch.bfloat16]
    assert np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(InputError, match="--precision"):
        SiteTrainer(plans, "site_a", net, num_workers=0, precision="half")


def test_bf16_training_learns_as_float32_does(site_root: Path, tmp_path: Path) -> None:
    """The same 30 iterations from the same start: both lower the loss, and their validation
    Dice and last losses agree closely (a bf16 path that trained wrongly would not)."""
    plans = tiny_plans(n_stages=2, features=(16, 32), iterations=30)
    outcomes = {}
    for precision in ("fp32", "bf16"):
        net, init = _start(plans)
        outcomes[precision] = train_local(plans, "site_a", site_root, tmp_path / precision, net, init, 1,
                                          num_workers=0, precision=precision)
    for outcome in outcomes.values():
        losses = [row["loss"] for row in outcome.history]
        assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.2
    assert abs(outcomes["bf16"].val_dice - outcomes["fp32"].val_dice) < 0.1, {k: o.val_dice for k, o in outcomes.items()}


def test_bf16_sliding_window_gives_float32_probabilities_close_to_float32s() -> None:
    plans = tiny_plans(n_stages=3)
    net, _init = _start(plans, seed=3)
    data = np.random.default_rng(0).normal(size=(1, 24, 20, 28)).astype(np.float32)
    exact = sliding_window_probabilities(net, data, [16, 16, 16], 2)
    fast = sliding_window_probabilities(net, data, [16, 16, 16], 2, precision="bf16")
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    assert np.allclose(fast.sum(axis=0), 1.0, atol=1e-5)      # combined in float32: still a distribution
    assert np.abs(fast - exact).max() < 0.02                  # bfloat16 keeps ~3 significant digits
    assert not np.array_equal(fast, exact)                    # and it did run in bfloat16


def test_a_mixmfl_forward_in_bf16_gives_float32_losses_that_reach_the_encoders() -> None:
    """MixMFL's own step: the network (memory retrieval included) under bfloat16 autocast, its
    decoupling terms on float32 copies of the features, as `MixMFLTrainer.train_step` does."""
    from fedseg.planning.plans import NetworkSpec
    from fedseg.training.device import autocast
    from fedseg.training.mixmfl_network import MixMFLNet
    from fedseg.training.mixmfl_trainer import decoupling_losses

    spec = NetworkSpec(3, [8, 16, 32], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [1, 1, 1], [1, 1])
    torch.manual_seed(0)
    net = MixMFLNet(spec, 3, ["T1", "T1ce", "T2", "FLAIR"], 2, present=[0, 2])
    with autocast("cpu", "bf16"):
        outputs, aux = net(torch.randn(2, 4, 16, 16, 16), return_aux=True)
    assert outputs[0].dtype == torch.bfloat16
    outputs, aux = float32_outputs((outputs, aux))
    cls, triplet = decoupling_losses(net, aux, classifier=True, triplet=True, margin=1.0)
    assert outputs[0].dtype == torch.float32 and cls.dtype == torch.float32 and triplet.dtype == torch.float32
    assert torch.isfinite(cls) and torch.isfinite(triplet)
    (outputs[0].float().mean() + cls + triplet).backward()
    assert net.shared.stages[-1].convs[0].conv.weight.grad.abs().sum() > 0
    assert net.tailored["T2"].stages[-1].convs[0].conv.weight.grad.abs().sum() > 0

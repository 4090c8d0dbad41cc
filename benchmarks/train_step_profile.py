"""One training step of fedseg's network + loss vs nnU-Net's, on one random batch, timed.

The profile behind train_speed.py: forward with the deep-supervision loss, then backward and
an SGD step (momentum 0.99, Nesterov), for the 3d_fullres network that both tools planned in
nnunet_peer.py's work folder (run train_speed.py or predict_speed.py once first). Iterations
2..N are averaged. Which network is chosen by the first argument; nnU-Net's code needs its
own venv, or can run on fedseg's torch by putting nnU-Net's site-packages after fedseg's:

    nice .venv/bin/python benchmarks/train_step_profile.py fedseg
    nice /path/to/nnunet_venv/bin/python benchmarks/train_step_profile.py nnunet
    PYTHONPATH=.venv/lib/python3.11/site-packages:/path/to/nnunet_venv/lib/python3.11/site-packages \
        nice .venv/bin/python benchmarks/train_step_profile.py nnunet      # on fedseg's torch

Prints the parameter count, torch version and the mean forward and backward+step seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

WORK = Path("/tmp/fedseg_peer")
PRE = WORK / "nnUNet_preprocessed" / "Dataset002_Peer"


def nnunet_network_and_loss():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(json.loads((PRE / "nnUNetPlans.json").read_text()))
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(pm, cm, 2, 3, True)
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2**i) for i in range(len(cm.pool_op_kernel_sizes))])
    weights[-1] = 0   # nnU-Net drops the lowest resolution
    return net, DeepSupervisionWrapper(loss, weights / weights.sum()), cm.patch_size


def fedseg_network_and_loss():
    from fedseg.federation.strategies import get_strategy
    from fedseg.training.recipes.registry import get_recipe
    from fedseg.planning.plans import load_plans
    from fedseg.training.losses import deep_supervision_scales, make_loss

    plans = load_plans(WORK / "fedseg" / "plans.json")
    site = sorted(plans.sites)[0]
    config = plans.configuration_for(site)
    net = get_recipe(get_strategy(plans.strategy.name).recipe).network(plans, site)
    return net, make_loss(plans.training.loss, deep_supervision_scales(config.network.strides)), config.patch_size


def main(which: str, iterations: int = 5) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net, loss, patch = nnunet_network_and_loss() if which == "nnunet" else fedseg_network_and_loss()
    x = torch.randn(2, 2, *patch)
    seg = torch.randint(0, 3, (2, 1, *patch)).float()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net.train()
    forward = backward = 0.0
    for i in range(iterations):
        t0 = time.perf_counter()
        out = net(x)
        targets = [torch.nn.functional.interpolate(seg, size=o.shape[2:], mode="nearest") for o in out]
        value = loss(out, targets)
        t1 = time.perf_counter()
        opt.zero_grad()
        value.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= 1:
            forward, backward = forward + t1 - t0, backward + t2 - t1
    n = iterations - 1
    print(f"{which}: {sum(p.numel() for p in net.parameters())} parameters, torch {torch.__version__}, patch {list(patch)}, "
          f"batch 2: forward + loss {forward / n:.2f} s, backward + step {backward / n:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1])

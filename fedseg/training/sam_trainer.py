"""Local training of the SAM segmenter (FedFMS): the default loop with AdamW (or the paper's Adam) instead of SGD.

SAM and MSA are fine-tuned with Adam (MSA: lr 1e-4); nnU-Net's SGD with momentum 0.99 at
lr 1e-2 drives a ViT to predict background everywhere. Everything else is the default
SiteTrainer: batches (2D slices, or 3D patches segmented slice by slice), loss, poly
schedule, validation, checkpoints and resume. The poly schedule keeps its shape and is
applied to `sam.lr` (plans.strategy.params) instead of training.initial_lr.

Adam's moments (exp_avg, exp_avg_sq, step) persist between rounds and in checkpoints the
same way SGD's momentum does (by parameter name), so a resumed round continues exactly.
"""

from __future__ import annotations

import torch

from fedseg.planning.plans import Plans
from fedseg.training.recipes.params import SamParams
from fedseg.training.trainer import SiteTrainer
from fedseg.typed_params import parse_params

# Adam learning rates: MSA fine-tunes pretrained SAM at 1e-4; the tiny configuration is
# trained from its seeded initialisation and needs a larger step to move within a few rounds.
DEFAULT_LR = {"tiny": 1e-2}
DEFAULT_PRETRAINED_LR = 1e-4
# Separator between a parameter name and the Adam state entry in saved optimizer files.
STATE_SEPARATOR = "::"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
# FedFMS trains with Adam, momentum parameters 0.9 and 0.999.
PAPER_BETAS = (0.9, 0.999)


def sam_learning_rate(plans: Plans) -> float:
    """`sam.lr`, else the default rate of the plan's SAM configuration."""
    params = parse_params(SamParams, plans.strategy.params)
    if params.lr is not None:
        return float(params.lr)
    return DEFAULT_LR.get(params.config, DEFAULT_PRETRAINED_LR)


class SamTrainer(SiteTrainer):
    """SiteTrainer with AdamW (or the paper's Adam) over the trainable parameters (the adapters
    and decoder for fedmsa)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        self.base_lr = sam_learning_rate(self.plans)
        params = parse_params(SamParams, self.plans.strategy.params)
        self.constant_lr = params.lr_schedule == "constant"
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        if params.optimizer == "adam":
            return torch.optim.Adam(trainable, lr=self.base_lr, betas=PAPER_BETAS)
        return torch.optim.AdamW(trainable, lr=self.base_lr, weight_decay=self.plans.training.weight_decay)

    def on_round_start(self, round_index: int) -> None:
        report = getattr(self.network, "checkpoint_report", None)
        if report:
            self.log(report)

    def set_lr(self, lr: float) -> None:
        if self.constant_lr:
            super().set_lr(self.base_lr)
            return
        # the trainer's poly schedule, rescaled from training.initial_lr to Adam's base rate
        super().set_lr(lr / self.plans.training.initial_lr * self.base_lr)

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.network.named_parameters():
            state = self.optimizer.state.get(p, {})
            for key in ADAM_STATE_KEYS:
                if key in state:
                    value = state[key]
                    value = value if torch.is_tensor(value) else torch.tensor(float(value))
                    out[f"{name}{STATE_SEPARATOR}{key}"] = value.detach().cpu().clone()
        return out

    def load_momentum(self, buffers: dict[str, torch.Tensor]) -> int:
        self.optimizer.state.clear()
        used = 0
        for name, p in self.network.named_parameters():
            entries = {key: buffers.get(f"{name}{STATE_SEPARATOR}{key}") for key in ADAM_STATE_KEYS}
            if any(v is None for v in entries.values()):
                continue
            if tuple(entries["exp_avg"].shape) != tuple(p.shape) or tuple(entries["exp_avg_sq"].shape) != tuple(p.shape):
                continue
            self.optimizer.state[p] = {
                "step": entries["step"].to(torch.float32).clone(),
                "exp_avg": entries["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": entries["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
            }
            used += 1
        return used

"""Local training of one site for one federated round.

`train_local` is the entry point; `SiteTrainer` holds the hooks (`on_round_start`,
`train_step`, `compute_loss`, `validate`, ...) that the round loop (fedseg.training.round_loop)
runs through, so strategies can change one piece without copying the rest.

Files in the site's state folder (all written atomically, safetensors only, never pickle):

    preprocessed/<plan_id[:16]>/<case>.npz + <case>.json   cached preprocessed training cases
                              (fedseg.training.case_cache)
    splits_final.json         the site's cross-validation folds (nnU-Net's layout; fedseg.training.folds)
    optimizer.safetensors     SGD momentum buffers keyed by parameter name, carried across rounds
    checkpoint.safetensors    model + momentum of the round in progress (or just finished);
                              lets a killed run resume and a finished round be re-called
                              without training again (fedseg.training.round_checkpoint)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.planning.plans import ConfigurationPlan, Plans
from fedseg.training import round_loop
from fedseg.training.case_cache import CachedCase, cache_dir, load_training_cases, site_layout
from fedseg.training.dataloading import BatchStream
from fedseg.training.device import autocast, check_precision, configure_backend, float32_outputs, grad_scaler, resolve_device
from fedseg.training.folds import Fold, fold_cases, load_or_create_splits
from fedseg.training.losses import deep_supervision_scales, make_loss
from fedseg.training.round_checkpoint import CHECKPOINT_FILE, OPTIMIZER_FILE, state_sha256
from fedseg.training.round_loop import POLY_EXPONENT, RoundRun, TrainOutcome, derived_seed, poly_lr
from fedseg.training.tiled_validation import argmax_decoder, foreground_dice, predict_indices, region_decoder

# Also importable from here, where they lived before the round loop, checkpoint files, case
# cache and validation tiling got modules of their own.
__all__ = [
    "CHECKPOINT_EVERY", "CHECKPOINT_FILE", "GRAD_CLIP_NORM", "OPTIMIZER_FILE", "POLY_EXPONENT", "CachedCase",
    "RoundRun", "SiteTrainer", "TrainOutcome", "argmax_decoder", "cache_dir", "derived_seed", "foreground_dice",
    "load_training_cases", "poly_lr", "predict_indices", "region_decoder", "site_layout", "state_sha256", "train_local",
]

# nnU-Net's gradient-norm clip: keeps the high-momentum SGD stable in early iterations.
GRAD_CLIP_NORM = 12.0
# Write a resumable checkpoint this often (iterations); also always at the end of a round.
CHECKPOINT_EVERY = 50


class SiteTrainer:
    """One site's local training; subclass and override the hooks to change a piece.

    Hooks: `on_round_start(round_index)`, `train_step(batch) -> float`,
    `compute_loss(outputs, target)`, `on_round_end(round_index)`, `validate() -> float`.
    """

    checkpoint_every: int = CHECKPOINT_EVERY
    grad_clip_norm: float = GRAD_CLIP_NORM
    max_voxels: int = DEFAULT_MAX_VOXELS   # images declaring more voxels are refused unread
    # Cross-validation fold (fedseg.training.folds): which of the site's splits this run
    # trains on; set by train_local, so subclasses keep their constructors.
    fold: Fold = 0

    def __init__(
        self,
        plans: Plans,
        site: str,
        network: nn.Module,
        device: str = "cpu",
        num_workers: int = 2,
        progress: Callable[..., None] | None = None,
        log: Callable[[str], None] | None = None,
        precision: str = "auto",
    ) -> None:
        """`progress(n=1, info="")` is called after each iteration (n = iterations advanced);
        `precision`: auto, fp32 or bf16 (fedseg.training.device)."""
        self.plans = plans
        self.site = site
        self.config: ConfigurationPlan = plans.configuration_for(site)
        self.device = resolve_device(device)
        configure_backend(self.device)
        self.precision = check_precision(precision)
        # float16 on CUDA as nnU-Net trains needs a scaler; float32 and bfloat16 steps do not (None)
        self.grad_scaler = grad_scaler(self.device, self.precision)
        self.network = network.to(self.device)
        self.num_workers = num_workers
        self.progress = progress
        self.log = log or (lambda message: None)
        self.deep_supervision_scales = (
            deep_supervision_scales(self.config.network.strides) if getattr(network, "deep_supervision", False) else None
        )
        layout = plans.label_layout
        self.region_class_indices = layout.region_class_indices() if layout.has_regions else None
        self.region_paint = layout.paint_class_indices()
        self.loss = make_loss(plans.training.loss, self.deep_supervision_scales, self.region_class_indices)
        self.optimizer = self.make_optimizer()
        self.train_cases: list[CachedCase] = []
        self.val_cases: list[CachedCase] = []

    def make_optimizer(self) -> torch.optim.Optimizer:
        """nnU-Net's SGD (Nesterov momentum); a hook, so a trainer of another model can choose its own."""
        training = self.plans.training
        return torch.optim.SGD(
            self.network.parameters(),
            lr=training.initial_lr,
            momentum=training.momentum,
            nesterov=True,
            weight_decay=training.weight_decay,
        )

    # -- data ---------------------------------------------------------------------------
    def prepare_data(self, dataset_root: Path, state_dir: Path) -> None:
        cases = load_training_cases(self.plans, self.site, dataset_root, state_dir, self.log, self.max_voxels)
        by_id = {c.case_id: c for c in cases}
        splits = load_or_create_splits(state_dir, list(by_id), self.plans.training.n_folds, self.plans.seed, self.site)
        train_ids, val_ids = fold_cases(splits, self.fold, list(by_id))
        self.train_cases = [by_id[i] for i in train_ids]
        self.val_cases = [by_id[i] for i in val_ids]

    def make_batches(self, seed: int) -> BatchStream:
        return BatchStream(
            self.train_cases,
            self.config.patch_size,
            self.config.batch_size,
            self.plans.training.oversample_foreground_percent,
            self.deep_supervision_scales,
            num_workers=self.num_workers,
            seed=seed,
        )

    # -- hooks --------------------------------------------------------------------------
    def on_round_start(self, round_index: int) -> None:
        """Called once before the first iteration of a round (also when resuming)."""

    def on_round_end(self, round_index: int) -> None:
        """Called once after the last iteration of a round, before validation and the final
        checkpoint (so what it changes in the model is part of the round's outcome)."""

    def compute_loss(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return self.loss(outputs, target)

    def train_step(self, batch: dict) -> float:
        """One SGD step on a batch; returns the loss value."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else target.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            outputs = self.network(data)
            if self.precision == "bf16":   # losses in float32: softmax and sums follow their input's dtype
                outputs = float32_outputs(outputs)
            loss = self.compute_loss(outputs, target)
        self.backward_and_step(loss)
        return float(loss.detach().cpu())

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward pass, gradient clipping and the optimizer step; on CUDA through the GradScaler,
        unscaled before clipping so the clip norm means the same as in float32 (nnU-Net's order)."""
        if self.grad_scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.optimizer.step()
            return
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def validate(self) -> float:
        """Mean foreground Dice on the validation split (the training cases when it is empty)."""
        cases = self.val_cases or self.train_cases
        if not cases:
            return float("nan")
        was_training = self.network.training
        deep_supervision = getattr(self.network, "deep_supervision", None)
        self.network.eval()
        if deep_supervision is not None:
            self.network.deep_supervision = False
        try:
            decode = argmax_decoder if self.region_class_indices is None else region_decoder(self.region_paint)
            preds = [predict_indices(self.network, c.data, self.config.patch_size, self.device, decode, self.precision) for c in cases]
        finally:
            if deep_supervision is not None:
                self.network.deep_supervision = deep_supervision
            self.network.train(was_training)
        refs = [np.maximum(c.seg[0], 0) for c in cases]
        return foreground_dice(preds, refs, self.plans.n_classes, self.region_class_indices)

    # -- optimizer state ----------------------------------------------------------------
    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.network.named_parameters():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[name] = buf.detach().cpu().clone()
        return out

    def load_momentum(self, buffers: dict[str, torch.Tensor]) -> int:
        """Install momentum buffers by parameter name (shape-checked); returns how many were used."""
        self.optimizer.state.clear()
        used = 0
        for name, p in self.network.named_parameters():
            buf = buffers.get(name)
            if buf is not None and tuple(buf.shape) == tuple(p.shape):
                self.optimizer.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype).clone()
                used += 1
        return used

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    # -- the round (fedseg.training.round_loop) -------------------------------------------
    def run_round(self, state_dir: Path, initial_state: dict[str, torch.Tensor], round_index: int,
                  iterations: int | None = None, dataset_root: Path | None = None) -> TrainOutcome:
        """Train one round, resuming or returning a finished round from the checkpoint (see
        round_loop.run_round: data is prepared from `dataset_root` only when training is needed)."""
        return round_loop.run_round(self, state_dir, initial_state, round_index, iterations, dataset_root)

    def _load_previous_momentum(self, path: Path, round_index: int) -> None:
        """Install the optimizer state saved after an earlier round (round_loop.load_previous_momentum)."""
        round_loop.load_previous_momentum(self, path, round_index)


def train_local(
    plans: Plans,
    site: str,
    dataset_root: Path,
    state_dir: Path,
    network: nn.Module,
    initial_state: dict[str, torch.Tensor],
    round_index: int,
    iterations: int | None = None,
    device: str = "cpu",
    num_workers: int = 2,
    progress: Callable | None = None,
    log: Callable[[str], None] | None = None,
    trainer_class: type[SiteTrainer] = SiteTrainer,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    fold: Fold = 0,
    precision: str = "auto",
) -> TrainOutcome:
    """Train `site` for round `round_index` (1-based) starting from `initial_state`.

    Poly LR runs over the whole federation: T = rounds x iterations per round (the given
    `iterations`, else the plan's), t = (round_index - 1) x iterations + local iteration.
    Calling again with the same round and initial state resumes a killed run from its
    checkpoint, or returns a finished round's outcome without training. `fold`: the
    cross-validation fold (0..n_folds-1 or "all") of the site's `splits_final.json`;
    `precision`: auto, fp32 or bf16 (fedseg.training.device).
    """
    plans.site(site)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    trainer = trainer_class(plans, site, network, device=device, num_workers=num_workers, progress=progress, log=log,
                            precision=precision)
    trainer.max_voxels = max_voxels
    trainer.fold = fold
    return trainer.run_round(state_dir, initial_state, round_index, iterations, dataset_root=Path(dataset_root))

"""One round of a site's local training: resume or start, the SGD steps, validation, checkpoints.

`run_round` drives a `SiteTrainer` (fedseg.training.trainer) through its hooks; the files it
reads and writes are those of fedseg.training.round_checkpoint. Poly LR runs over the whole
federation: T = rounds x iterations per round, t = (round_index - 1) x iterations + local
iteration.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fedseg.planning.plans import Plans
from fedseg.training.folds import Fold
from fedseg.training.round_checkpoint import (
    CHECKPOINT_FILE,
    OPTIMIZER_FILE,
    SavedRound,
    checkpoint_identity,
    read_momentum,
    read_round_checkpoint,
    save_round_momentum,
    state_sha256,
    write_round_checkpoint,
)

# nnU-Net's PolyLRScheduler exponent.
POLY_EXPONENT = 0.9


@dataclass
class TrainOutcome:
    state_dict: dict[str, torch.Tensor]   # full model after local training (cpu tensors)
    n_iterations: int                     # iterations run in this round
    val_dice: float                       # mean foreground Dice on the site's local validation split
    mean_loss: float
    incoming_val_dice: float = float("nan")   # the same Dice for the model the round started from
    n_val_cases: int = 0                  # validation cases behind both Dice values
    history: list[dict] = field(default_factory=list)   # one row per iteration: iteration, loss, lr, data_wait_s, step_s
    data_wait_s: float = 0.0              # seconds the loop waited for batches (data pipeline wait time)
    train_s: float = 0.0                  # seconds in the training loop (waiting + steps)
    resumed_from: int = 0                 # iteration the round resumed at (0 = started fresh)
    from_checkpoint: bool = False         # True when a finished round was returned without training


def _fresh_log() -> dict[str, Any]:
    return {"loss_sum": 0.0, "history": [], "data_wait_s": 0.0, "train_s": 0.0}


@dataclass
class RoundRun:
    """One call of `run_round`: the round, its files, and how far it has got."""

    round_index: int
    iterations: int                 # iterations of this round
    state_dir: Path
    identity: dict[str, str]        # the metadata its checkpoint must match
    start: int = 0                  # iteration training starts at (> 0 when resumed)
    # the loop's log, saved with every checkpoint: loss sum, history, timings, validation scores
    log: dict[str, Any] = field(default_factory=_fresh_log)

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT_FILE

    @property
    def optimizer_path(self) -> Path:
        return self.state_dir / OPTIMIZER_FILE


class RoundTrainer(Protocol):
    """What `run_round` uses of a trainer: SiteTrainer's attributes and hooks."""

    plans: Plans
    site: str
    fold: Fold
    network: nn.Module
    optimizer: torch.optim.Optimizer
    grad_scaler: Any
    progress: Callable[..., None] | None
    log: Callable[[str], None]
    train_cases: list
    val_cases: list
    checkpoint_every: int

    def prepare_data(self, dataset_root: Path, state_dir: Path) -> None: ...
    def make_batches(self, seed: int) -> Iterator[dict]: ...
    def on_round_start(self, round_index: int) -> None: ...
    def on_round_end(self, round_index: int) -> None: ...
    def set_lr(self, lr: float) -> None: ...
    def train_step(self, batch: dict) -> float: ...
    def validate(self) -> float: ...
    def momentum_buffers(self) -> dict[str, torch.Tensor]: ...
    def load_momentum(self, buffers: dict[str, torch.Tensor]) -> int: ...
    def model_state(self) -> dict[str, torch.Tensor]: ...


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed from any parts (plan seed, site name, round...), stable across runs and platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def poly_lr(initial_lr: float, step: int, total_steps: int) -> float:
    """nnU-Net's poly schedule initial_lr * (1 - t/T)^0.9 (0 beyond T)."""
    if total_steps <= 0:
        return initial_lr
    return initial_lr * max(0.0, 1.0 - step / total_steps) ** POLY_EXPONENT


def run_round(
    trainer: RoundTrainer,
    state_dir: Path,
    initial_state: dict[str, torch.Tensor],
    round_index: int,
    iterations: int | None = None,
    dataset_root: Path | None = None,
) -> TrainOutcome:
    """Train one round, resuming or returning a finished round from the checkpoint.

    Data is prepared from `dataset_root` only when training is needed (not for a
    finished round), unless `prepare_data` was called before.
    """
    if round_index < 1:
        raise ValueError("round_index is 1-based")
    state_dir = Path(state_dir)
    per_round = int(iterations if iterations is not None else trainer.plans.training.iterations_per_round)
    if per_round < 1:
        raise ValueError("iterations must be at least 1")
    identity = checkpoint_identity(trainer.plans.plan_id, trainer.site, round_index, per_round,
                                   state_sha256(initial_state), trainer.fold)
    run = RoundRun(round_index, per_round, state_dir, identity)
    saved = read_round_checkpoint(run.checkpoint_path, identity)
    if saved is not None and saved.finished:
        return _finished_outcome(trainer, saved, run)
    if saved is not None:
        _resume(trainer, saved, run)
    else:
        trainer.network.load_state_dict(initial_state)
        load_previous_momentum(trainer, run.optimizer_path, round_index)

    if not trainer.train_cases:
        if dataset_root is None:
            raise ValueError("no training data: call prepare_data() or pass dataset_root")
        trainer.prepare_data(Path(dataset_root), state_dir)
    if "incoming_val_dice" not in run.log:
        # Score the model as it arrived (before any local step): the coordinator ranks
        # rounds by it. Saved with every checkpoint, so a resumed round keeps this value.
        run.log["incoming_val_dice"] = trainer.validate()
        # a fold without validation cases scores on its training cases: reported with
        # no case count, so the coordinator does not rank rounds by it
        run.log["n_val_cases"] = len(trainer.val_cases)

    trainer.network.train()
    trainer.on_round_start(round_index)
    if run.start < per_round:
        _train_iterations(trainer, run)
    return _finish_round(trainer, run)


def _finished_outcome(trainer: RoundTrainer, saved: SavedRound, run: RoundRun) -> TrainOutcome:
    """The outcome of a round whose checkpoint says it finished, without training again."""
    trainer.network.load_state_dict(saved.model)
    trainer.log(f"round {run.round_index} already finished; returning the saved outcome")
    if trainer.progress is not None:
        trainer.progress(run.iterations, "already finished")
    state = saved.state
    return TrainOutcome(
        state_dict=saved.model,
        n_iterations=run.iterations,
        val_dice=_float_or_nan(state["val_dice"]),
        mean_loss=_float_or_nan(state["mean_loss"]),
        incoming_val_dice=_float_or_nan(state.get("incoming_val_dice")),
        n_val_cases=int(state.get("n_val_cases", 0)),
        history=state["history"],
        data_wait_s=state["data_wait_s"],
        train_s=state["train_s"],
        resumed_from=state.get("resumed_from", 0),
        from_checkpoint=True,
    )


def _resume(trainer: RoundTrainer, saved: SavedRound, run: RoundRun) -> None:
    """Continue a killed round: model, optimizer state, loss scale and log as checkpointed."""
    trainer.network.load_state_dict(saved.model)
    trainer.load_momentum(saved.momentum)
    run.start = saved.iteration
    run.log = saved.state
    if trainer.grad_scaler is not None and saved.state.get("grad_scaler"):
        trainer.grad_scaler.load_state_dict(saved.state["grad_scaler"])   # the loss scale reached, not a fresh one
    trainer.log(f"resuming round {run.round_index} at iteration {run.start}/{run.iterations}")
    if trainer.progress is not None and run.start:
        trainer.progress(run.start, "resumed from checkpoint")


def _train_iterations(trainer: RoundTrainer, run: RoundRun) -> None:
    """The SGD steps from `run.start` to the end of the round, checkpointing every `checkpoint_every`."""
    total = trainer.plans.training.rounds * run.iterations
    offset = (run.round_index - 1) * run.iterations
    batches = trainer.make_batches(derived_seed(trainer.plans.seed, trainer.site, run.round_index, run.start))
    try:
        for i in range(run.start, run.iterations):
            lr = poly_lr(trainer.plans.training.initial_lr, offset + i, total)
            trainer.set_lr(lr)
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            loss = trainer.train_step(batch)
            t2 = time.perf_counter()
            if not math.isfinite(loss):
                raise FloatingPointError(f"site {trainer.site}: loss became {loss} at iteration {i + 1}")
            run.log["loss_sum"] += loss
            run.log["data_wait_s"] += t1 - t0
            run.log["train_s"] += t2 - t0
            run.log["history"].append(
                {"iteration": i + 1, "loss": loss, "lr": lr, "data_wait_s": t1 - t0, "step_s": t2 - t1}
            )
            if trainer.progress is not None:
                trainer.progress(1, f"loss {loss:.4f}")
            done = i + 1
            if done < run.iterations and done % trainer.checkpoint_every == 0:
                _save_checkpoint(trainer, run, done, finished=False)
    finally:
        batches.close()


def _finish_round(trainer: RoundTrainer, run: RoundRun) -> TrainOutcome:
    """End-of-round hook, validation, and the files the next call starts from."""
    trainer.on_round_end(run.round_index)
    val_dice = trainer.validate()
    mean_loss = run.log["loss_sum"] / run.iterations
    # Momentum for the next round first, then the finished checkpoint: if killed in
    # between, the re-call resumes from the last checkpoint (which has its own momentum).
    save_round_momentum(run.optimizer_path, trainer.momentum_buffers(), run.round_index, trainer.site)
    _save_checkpoint(trainer, run, run.iterations, finished=True, extra={"val_dice": val_dice, "mean_loss": mean_loss})
    trainer.log(f"round {run.round_index}: {run.iterations} iterations, mean loss {mean_loss:.4f}, val Dice {val_dice:.4f}")
    return TrainOutcome(
        state_dict=trainer.model_state(),
        n_iterations=run.iterations,
        val_dice=val_dice,
        mean_loss=mean_loss,
        incoming_val_dice=_float_or_nan(run.log["incoming_val_dice"]),
        n_val_cases=int(run.log["n_val_cases"]),
        history=run.log["history"],
        data_wait_s=run.log["data_wait_s"],
        train_s=run.log["train_s"],
        resumed_from=run.start,
    )


def _save_checkpoint(trainer: RoundTrainer, run: RoundRun, done: int, finished: bool, extra: dict | None = None) -> None:
    """Checkpoint after `done` iterations: model, optimizer state, the loop's log and the loss scale."""
    model, momentum = trainer.model_state(), trainer.momentum_buffers()
    state = {**run.log, "resumed_from": run.start, **(extra or {})}
    if trainer.grad_scaler is not None:
        state["grad_scaler"] = trainer.grad_scaler.state_dict()
    write_round_checkpoint(run.checkpoint_path, run.identity, model, momentum, state, done, finished)


def load_previous_momentum(trainer: RoundTrainer, path: Path, round_index: int) -> None:
    """Momentum from an earlier round carries over (nnU-Net trains one continuous schedule)."""
    trainer.optimizer.state.clear()
    saved = read_momentum(path)
    if saved is None:
        return
    tensors, after = saved
    if after >= round_index:
        # written by a later (or this) round: not the state this round should start from
        trainer.log(f"ignoring momentum saved after round {after} when starting round {round_index}")
        return
    trainer.load_momentum(tensors)


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)

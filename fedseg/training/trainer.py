"""Local training of one site for one federated round.

`train_local` is the entry point; `SiteTrainer` holds the loop and its hooks
(`on_round_start`, `train_step`, `compute_loss`, `validate`) so strategies can change one
piece without copying the rest.

Files in the site's state folder (all written atomically, safetensors only, never pickle):

    preprocessed/<plan_id[:16]>/<case>.npz + <case>.json   cached preprocessed training cases
    splits_final.json         the site's cross-validation folds (nnU-Net's layout; fedseg.training.folds)
    optimizer.safetensors     SGD momentum buffers keyed by parameter name, carried across rounds
    checkpoint.safetensors    model + momentum of the round in progress (or just finished), with
                              metadata: plan, site, round, iterations done, sha256 of the initial
                              state; lets a killed run resume and a finished round be re-called
                              without training again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fedseg.atomic import atomic_path, write_json_atomic
from fedseg.data.channels import expand_to_plan, plan_channel_list, site_channel_indices
from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError
from fedseg.planning.plans import ConfigurationPlan, Plans
from fedseg.training.dataloading import BatchStream
from fedseg.training.device import autocast, configure_backend, grad_scaler, resolve_device
from fedseg.training.folds import Fold, fold_cases, load_or_create_splits
from fedseg.training.losses import deep_supervision_scales, make_loss

# nnU-Net's gradient-norm clip: keeps the high-momentum SGD stable in early iterations.
GRAD_CLIP_NORM = 12.0
# nnU-Net's PolyLRScheduler exponent.
POLY_EXPONENT = 0.9
# Write a resumable checkpoint this often (iterations); also always at the end of a round.
CHECKPOINT_EVERY = 50
CHECKPOINT_FILE = "checkpoint.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_FORMAT = "fedseg-checkpoint/1"
MODEL_PREFIX = "model."
MOMENTUM_PREFIX = "momentum."


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


@dataclass
class CachedCase:
    """A preprocessed training case as the loader and validation use it."""

    case_id: str
    data: np.ndarray          # (C, z, y, x) float32
    seg: np.ndarray           # (1, z, y, x) int16 class indices, -1 outside the nonzero region
    properties: dict


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash over names, dtypes, shapes and bytes: identifies the state a round started from."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed from any parts (plan seed, site name, round...), stable across runs and platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def poly_lr(initial_lr: float, step: int, total_steps: int) -> float:
    """nnU-Net's poly schedule initial_lr * (1 - t/T)^0.9 (0 beyond T)."""
    if total_steps <= 0:
        return initial_lr
    return initial_lr * max(0.0, 1.0 - step / total_steps) ** POLY_EXPONENT


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Tensors and metadata, or None when the file is missing or unreadable (then it is ignored)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except Exception:  # safetensors raises several types for damaged files; treat as absent
        return None


# ---------------------------------------------------------------------------------------
# preprocessing cache
# ---------------------------------------------------------------------------------------


def cache_dir(plans: Plans, state_dir: Path) -> Path:
    return Path(state_dir) / "preprocessed" / plans.plan_id[:16]


def site_layout(plans: Plans, dataset: Any, dataset_json: Path) -> list[int] | None:
    """Plan index of each of the dataset's channels (None: the plan's own layout).

    A site of a mix-modal plan holds a subset of the plan's channels (matched by name);
    otherwise the dataset must have the plan's number of channels.
    """
    try:
        return site_channel_indices(plan_channel_list(plans.channel_names), plan_channel_list(dataset.channel_names))
    except InputError as exc:
        raise InputError(f"dataset has {dataset.n_channels} channel(s), the plan expects {plans.n_channels} ({exc.detail})",
                         dataset_json) from None


def load_training_cases(
    plans: Plans,
    site: str,
    dataset_root: Path,
    state_dir: Path,
    log: Callable[[str], None] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> list[CachedCase]:
    """The site's training cases, preprocessed per its configuration (cached in the state folder).

    Every file's header is checked against `max_voxels` before the first case is read."""
    from fedseg.data.case_loading import check_case_sizes, load_case
    from fedseg.data.dataset import load_dataset
    from fedseg.training.preprocessing import preprocess_case

    dataset = load_dataset(dataset_root)
    layout = site_layout(plans, dataset, Path(dataset_root) / "dataset.json")
    config = plans.configuration_for(site)
    label_values = plans.label_values
    folder = cache_dir(plans, state_dir)
    cases = []
    site_cases = dataset.cases("Tr")
    check_case_sizes(site_cases, max_voxels)
    for case in site_cases:
        npz, meta = folder / f"{case.case_id}.npz", folder / f"{case.case_id}.json"
        if npz.is_file() and meta.is_file():
            with np.load(npz, allow_pickle=False) as arrays:
                data, seg = arrays["data"], arrays["seg"]
            properties = json.loads(meta.read_text())
        else:
            case_data = load_case(case, label_values, max_voxels=max_voxels)
            if layout is not None:   # a mix-modal site: its channels in the plan's order, absent ones zero
                case_data = dataclasses.replace(case_data, data=expand_to_plan(case_data.data, layout, plans.n_channels))
            pre = preprocess_case(case_data, plans, config)
            data, seg, properties = pre.data, pre.seg, _jsonable(pre.properties)
            with atomic_path(npz) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, data=data, seg=seg)
            # the json is written last: a case counts as cached only when both files exist
            write_json_atomic(meta, properties)
            if log:
                log(f"preprocessed {case.case_id} -> shape {list(data.shape[1:])}")
        cases.append(CachedCase(case.case_id, data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False), properties))
    return cases


# ---------------------------------------------------------------------------------------
# validation (whole cases, tiled with non-overlapping patches)
# ---------------------------------------------------------------------------------------


def _tile_starts(n: int, p: int) -> list[int]:
    starts = list(range(0, max(n - p, 0) + 1, p))
    if starts[-1] + p < n:
        starts.append(n - p)
    return starts


def argmax_decoder(logits: torch.Tensor) -> torch.Tensor:
    """(K, ...) logits -> class indices (softmax classes)."""
    return logits.argmax(0)


def region_decoder(paint: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(R, ...) region logits -> class indices, painted as a prediction is (fedseg.data.labels):
    in turn, region r gets class index `paint[r]` where its sigmoid exceeds 0.5."""

    def decode(logits: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(logits.shape[1:], dtype=torch.long, device=logits.device)
        for r, index in enumerate(paint):
            out[logits[r] > 0] = index   # sigmoid > 0.5
        return out

    return decode


@torch.no_grad()
def predict_indices(
    network: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: str,
    decode: Callable[[torch.Tensor], torch.Tensor] = argmax_decoder,
) -> np.ndarray:
    """Class-index map (z, y, x) of a preprocessed case: the volume is padded to at least the
    patch and covered by patch-sized tiles (last tile aligned to the border), one forward pass
    each. Cheap and memory-bounded; the sliding-window Gaussian blend of inference is not needed
    for a training-time validation score. `decode` turns a tile's logits into class indices."""
    is_2d = len(patch_size) == 2
    spatial = data.shape[2:] if is_2d else data.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch_size, spatial)]
    pad_lo = [p // 2 for p in pad]
    widths = [(0, 0)] * (2 if is_2d else 1) + [(lo, p - lo) for lo, p in zip(pad_lo, pad)]
    padded = np.pad(data, widths, mode="constant") if any(pad) else data
    full = padded.shape[2:] if is_2d else padded.shape[1:]
    starts = [_tile_starts(n, p) for n, p in zip(full, patch_size)]
    slices = [z for z in range(padded.shape[1])] if is_2d else [None]
    out_shape = (padded.shape[1], *full) if is_2d else tuple(full)
    result = np.zeros(out_shape, dtype=np.int16)
    for z in slices:
        volume = padded[:, z] if is_2d else padded
        for corner in np.ndindex(*[len(s) for s in starts]):
            lo = [starts[d][corner[d]] for d in range(len(patch_size))]
            window = tuple(slice(a, a + p) for a, p in zip(lo, patch_size))
            x = torch.from_numpy(np.ascontiguousarray(volume[(slice(None), *window)]))[None].to(device)
            with autocast(device):
                logits = network(x)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            labels = decode(logits[0]).cpu().numpy().astype(np.int16)
            if is_2d:
                result[(z, *window)] = labels
            else:
                result[window] = labels
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, spatial))
    return result[(slice(None), *crop)] if is_2d else result[crop]


def foreground_dice(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], n_classes: int,
    region_class_indices: Sequence[Sequence[int]] | None = None,
) -> float:
    """Mean over foreground classes of the Dice pooled over all cases (nnU-Net's pseudo Dice).

    Pooling TP/FP/FN over cases keeps small or empty cases from dominating; a class absent
    from both prediction and reference everywhere is left out; NaN when no class is present.
    With `region_class_indices`, each region (the union of its class indices) is scored instead.
    """
    groups = [list(r) for r in region_class_indices] if region_class_indices is not None else [[c] for c in range(1, n_classes)]
    tp = np.zeros(len(groups))
    fp = np.zeros(len(groups))
    fn = np.zeros(len(groups))
    for pred, ref in zip(preds, refs):
        for g, members in enumerate(groups):
            p, r = np.isin(pred, members), np.isin(ref, members)
            tp[g] += np.count_nonzero(p & r)
            fp[g] += np.count_nonzero(p & ~r)
            fn[g] += np.count_nonzero(~p & r)
    denom = 2 * tp + fp + fn
    present = denom > 0
    if not present.any():
        return float("nan")
    return float(np.mean(2 * tp[present] / denom[present]))


# ---------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------


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
    ) -> None:
        """`progress(n=1, info="")` is called after each iteration (n = iterations advanced)."""
        self.plans = plans
        self.site = site
        self.config: ConfigurationPlan = plans.configuration_for(site)
        self.device = resolve_device(device)
        configure_backend(self.device)
        # mixed precision on CUDA as nnU-Net trains (None on the CPU: plain float32 steps)
        self.grad_scaler = grad_scaler(self.device)
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
        with autocast(self.device):
            loss = self.compute_loss(self.network(data), target)
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
            preds = [predict_indices(self.network, c.data, self.config.patch_size, self.device, decode) for c in cases]
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

    # -- the round ----------------------------------------------------------------------
    def run_round(
        self,
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
        per_round = int(iterations if iterations is not None else self.plans.training.iterations_per_round)
        if per_round < 1:
            raise ValueError("iterations must be at least 1")
        init_hash = state_sha256(initial_state)
        identity = {
            "format": CHECKPOINT_FORMAT,
            "plan_id": self.plans.plan_id,
            "site": self.site,
            "round_index": str(round_index),
            "iterations": str(per_round),
            "init_sha256": init_hash,
            "fold": str(self.fold),
        }
        ckpt_path, opt_path = state_dir / CHECKPOINT_FILE, state_dir / OPTIMIZER_FILE

        start, log_state = 0, {"loss_sum": 0.0, "history": [], "data_wait_s": 0.0, "train_s": 0.0}
        checkpoint = _read_safetensors(ckpt_path)
        if checkpoint is not None and all(checkpoint[1].get(k) == v for k, v in identity.items()):
            tensors, meta = checkpoint
            saved = json.loads(meta["state"])
            model = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
            if meta.get("finished") == "true":
                self.network.load_state_dict(model)
                self.log(f"round {round_index} already finished; returning the saved outcome")
                if self.progress is not None:
                    self.progress(per_round, "already finished")
                return TrainOutcome(
                    state_dict=model,
                    n_iterations=per_round,
                    val_dice=_float(saved["val_dice"]),
                    mean_loss=_float(saved["mean_loss"]),
                    incoming_val_dice=_float(saved.get("incoming_val_dice")),
                    n_val_cases=int(saved.get("n_val_cases", 0)),
                    history=saved["history"],
                    data_wait_s=saved["data_wait_s"],
                    train_s=saved["train_s"],
                    resumed_from=saved.get("resumed_from", 0),
                    from_checkpoint=True,
                )
            self.network.load_state_dict(model)
            self.load_momentum({k[len(MOMENTUM_PREFIX):]: v for k, v in tensors.items() if k.startswith(MOMENTUM_PREFIX)})
            start = int(meta["iteration"])
            log_state = saved
            if self.grad_scaler is not None and saved.get("grad_scaler"):
                self.grad_scaler.load_state_dict(saved["grad_scaler"])   # the loss scale reached, not a fresh one
            self.log(f"resuming round {round_index} at iteration {start}/{per_round}")
            if self.progress is not None and start:
                self.progress(start, "resumed from checkpoint")
        else:
            self.network.load_state_dict(initial_state)
            self._load_previous_momentum(opt_path, round_index)

        if not self.train_cases:
            if dataset_root is None:
                raise ValueError("no training data: call prepare_data() or pass dataset_root")
            self.prepare_data(Path(dataset_root), state_dir)
        if "incoming_val_dice" not in log_state:
            # Score the model as it arrived (before any local step): the coordinator ranks
            # rounds by it. Saved with every checkpoint, so a resumed round keeps this value.
            log_state["incoming_val_dice"] = self.validate()
            # a fold without validation cases scores on its training cases: reported with
            # no case count, so the coordinator does not rank rounds by it
            log_state["n_val_cases"] = len(self.val_cases)

        total = self.plans.training.rounds * per_round
        offset = (round_index - 1) * per_round
        self.network.train()
        self.on_round_start(round_index)
        resumed_from = start

        def save_checkpoint(done: int, finished: bool, extra: dict | None = None) -> None:
            tensors = {MODEL_PREFIX + k: v for k, v in self.model_state().items()}
            tensors.update({MOMENTUM_PREFIX + k: v for k, v in self.momentum_buffers().items()})
            state = {**log_state, "resumed_from": resumed_from, **(extra or {})}
            if self.grad_scaler is not None:
                state["grad_scaler"] = self.grad_scaler.state_dict()
            meta = {**identity, "iteration": str(done), "finished": "true" if finished else "false",
                    "state": json.dumps(_jsonable(state), allow_nan=True)}
            _save_safetensors(ckpt_path, tensors, meta)

        if start < per_round:
            batches = self.make_batches(derived_seed(self.plans.seed, self.site, round_index, start))
            try:
                for i in range(start, per_round):
                    lr = poly_lr(self.plans.training.initial_lr, offset + i, total)
                    self.set_lr(lr)
                    t0 = time.perf_counter()
                    batch = next(batches)
                    t1 = time.perf_counter()
                    loss = self.train_step(batch)
                    t2 = time.perf_counter()
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"site {self.site}: loss became {loss} at iteration {i + 1}")
                    log_state["loss_sum"] += loss
                    log_state["data_wait_s"] += t1 - t0
                    log_state["train_s"] += t2 - t0
                    log_state["history"].append(
                        {"iteration": i + 1, "loss": loss, "lr": lr, "data_wait_s": t1 - t0, "step_s": t2 - t1}
                    )
                    if self.progress is not None:
                        self.progress(1, f"loss {loss:.4f}")
                    done = i + 1
                    if done < per_round and done % self.checkpoint_every == 0:
                        save_checkpoint(done, finished=False)
            finally:
                batches.close()

        self.on_round_end(round_index)
        val_dice = self.validate()
        mean_loss = log_state["loss_sum"] / per_round
        # Momentum for the next round first, then the finished checkpoint: if killed in
        # between, the re-call resumes from the last checkpoint (which has its own momentum).
        _save_safetensors(opt_path, self.momentum_buffers(), {"after_round": str(round_index), "site": self.site})
        save_checkpoint(per_round, finished=True, extra={"val_dice": val_dice, "mean_loss": mean_loss})
        self.log(f"round {round_index}: {per_round} iterations, mean loss {mean_loss:.4f}, val Dice {val_dice:.4f}")
        return TrainOutcome(
            state_dict=self.model_state(),
            n_iterations=per_round,
            val_dice=val_dice,
            mean_loss=mean_loss,
            incoming_val_dice=_float(log_state["incoming_val_dice"]),
            n_val_cases=int(log_state["n_val_cases"]),
            history=log_state["history"],
            data_wait_s=log_state["data_wait_s"],
            train_s=log_state["train_s"],
            resumed_from=resumed_from,
        )

    def _load_previous_momentum(self, path: Path, round_index: int) -> None:
        """Momentum from an earlier round carries over (nnU-Net trains one continuous schedule)."""
        self.optimizer.state.clear()
        saved = _read_safetensors(path)
        if saved is None:
            return
        tensors, meta = saved
        try:
            after = int(meta.get("after_round", "0"))
        except ValueError:
            after = 0
        if after >= round_index:
            # written by a later (or this) round: not the state this round should start from
            self.log(f"ignoring momentum saved after round {after} when starting round {round_index}")
            return
        self.load_momentum(tensors)


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


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
) -> TrainOutcome:
    """Train `site` for round `round_index` (1-based) starting from `initial_state`.

    Poly LR runs over the whole federation: T = rounds x iterations per round (the given
    `iterations`, else the plan's), t = (round_index - 1) x iterations + local iteration.
    Calling again with the same round and initial state resumes a killed run from its
    checkpoint, or returns a finished round's outcome without training. `fold`: the
    cross-validation fold (0..n_folds-1 or "all") of the site's `splits_final.json`.
    """
    plans.site(site)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    trainer = trainer_class(plans, site, network, device=device, num_workers=num_workers, progress=progress, log=log)
    trainer.max_voxels = max_voxels
    trainer.fold = fold
    return trainer.run_round(state_dir, initial_state, round_index, iterations, dataset_root=Path(dataset_root))

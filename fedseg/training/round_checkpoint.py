"""The files a site's local training keeps in its state folder between calls (safetensors only,
never pickle; all written atomically):

    optimizer.safetensors     optimizer state (SGD momentum buffers) keyed by parameter name,
                              carried across rounds
    checkpoint.safetensors    model + optimizer state of the round in progress (or just
                              finished), with metadata: plan, site, round, iterations done,
                              sha256 of the initial state; lets a killed run resume and a
                              finished round be re-called without training again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedseg.atomic import atomic_path
from fedseg.training.folds import Fold
from fedseg.training.json_values import jsonable
from fedseg.training.site_state import CHECKPOINT_FILE, OPTIMIZER_FILE

CHECKPOINT_FORMAT = "fedseg-checkpoint/1"
MODEL_PREFIX = "model."
MOMENTUM_PREFIX = "momentum."


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


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Tensors and metadata, or None when the file is missing or unreadable (then it is ignored)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except Exception:  # safetensors raises several types for damaged files; treat as absent
        return None


def checkpoint_identity(
    plan_id: str, site: str, round_index: int, iterations: int, init_sha256: str, fold: Fold,
) -> dict[str, str]:
    """The metadata a checkpoint must match to belong to this call: same plan, site, round,
    iterations per round, initial state and fold."""
    return {
        "format": CHECKPOINT_FORMAT,
        "plan_id": plan_id,
        "site": site,
        "round_index": str(round_index),
        "iterations": str(iterations),
        "init_sha256": init_sha256,
        "fold": str(fold),
    }


@dataclass
class SavedRound:
    """A checkpoint of the round being called: where it stopped and what it had logged."""

    model: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]   # optimizer state by parameter name
    metadata: dict[str, str]
    state: dict[str, Any]               # the loop's log: loss sum, history, timings, scores

    @property
    def finished(self) -> bool:
        return self.metadata.get("finished") == "true"

    @property
    def iteration(self) -> int:
        return int(self.metadata["iteration"])


def read_round_checkpoint(path: Path, identity: dict[str, str]) -> SavedRound | None:
    """The checkpoint at `path` when it matches `identity`; None when absent, damaged or another round's."""
    checkpoint = read_safetensors(path)
    if checkpoint is None or not all(checkpoint[1].get(k) == v for k, v in identity.items()):
        return None
    tensors, meta = checkpoint
    return SavedRound(
        model={k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)},
        momentum={k[len(MOMENTUM_PREFIX):]: v for k, v in tensors.items() if k.startswith(MOMENTUM_PREFIX)},
        metadata=meta,
        state=json.loads(meta["state"]),
    )


def write_round_checkpoint(
    path: Path, identity: dict[str, str], model: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
    state: dict[str, Any], done: int, finished: bool,
) -> None:
    """Save model, optimizer state and the loop's log after `done` iterations of the round."""
    tensors = {MODEL_PREFIX + k: v for k, v in model.items()}
    tensors.update({MOMENTUM_PREFIX + k: v for k, v in momentum.items()})
    meta = {**identity, "iteration": str(done), "finished": "true" if finished else "false",
            "state": json.dumps(jsonable(state), allow_nan=True)}
    save_safetensors(path, tensors, meta)


def save_round_momentum(path: Path, momentum: dict[str, torch.Tensor], round_index: int, site: str) -> None:
    """The optimizer state the next round starts from, marked with the round that wrote it."""
    save_safetensors(path, momentum, {"after_round": str(round_index), "site": site})


def read_momentum(path: Path) -> tuple[dict[str, torch.Tensor], int] | None:
    """Optimizer state saved after a round and that round's index (0 when unreadable); None when absent."""
    saved = read_safetensors(path)
    if saved is None:
        return None
    tensors, meta = saved
    try:
        after = int(meta.get("after_round", "0"))
    except ValueError:
        after = 0
    return tensors, after

"""A site's state folder (`state/<site>/` of a run folder, `--state` of `fedseg train`): its
layout, in one place, and the files that carry a site from one round to the next.

    local.safetensors                  the tensors the plan's route table keeps at the site
    checkpoint.safetensors             the trainer's checkpoint of the round in progress
    optimizer.safetensors              the optimizer's momentum, carried across rounds
    splits_final.json                  the site's cross-validation splits (fedseg.training.folds)
    preprocessed/<plan_id[:16]>/       training cases preprocessed once (fedseg.training.case_cache)
    before_round/<r>/                  the round files round r started from (hard links), from
                                       which a run redoes a round

Torch-free: tensors are read and written as numpy arrays.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedseg.atomic import atomic_path
from fedseg.errors import InputError

LOCAL_STATE_FILE = "local.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SPLITS_FILE = "splits_final.json"
CACHE_DIR = "preprocessed"
SNAPSHOT_DIR = "before_round"
# the files a round reads from the state folder and changes for the next one
ROUND_STATE_FILES = (LOCAL_STATE_FILE, OPTIMIZER_FILE)


def cache_dir(plan_id: str, state_dir: Path) -> Path:
    """Where the training cases preprocessed for plan `plan_id` are cached."""
    return Path(state_dir) / CACHE_DIR / plan_id[:16]


def load_local_state(state_dir: Path) -> dict[str, np.ndarray]:
    """The site's local tensors ({} before its first round)."""
    path = Path(state_dir) / LOCAL_STATE_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(f"cannot read local state ({exc})", path) from None


def save_local_state(state_dir: Path, tensors: Mapping[str, Any]) -> None:
    """Write the site's local tensors (numpy arrays or CPU/GPU torch tensors)."""
    arrays = {name: np.ascontiguousarray(_to_numpy(value)) for name, value in tensors.items()}
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(state_dir) / LOCAL_STATE_FILE) as tmp:
        save_file(arrays, str(tmp))


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):   # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def snapshot_site_state(state_dir: Path, round_index: int) -> None:
    """Keep the state files round `round_index` starts from (once: the first start counts).

    Hard links where possible: every state file is replaced by rename, never changed in
    place, so a link keeps the old content for free."""
    target = Path(state_dir) / SNAPSHOT_DIR / f"{round_index:03d}"
    if target.is_dir():
        return
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ROUND_STATE_FILES:
        source = Path(state_dir) / name
        if source.is_file():
            try:
                os.link(source, staging / name)
            except OSError:
                shutil.copyfile(source, staging / name)
    os.replace(staging, target)


def restore_site_state(state_dir: Path, round_index: int) -> bool:
    """Put back the state files round `round_index` started from, and forget later snapshots;
    False when there is no snapshot of that round."""
    root = Path(state_dir) / SNAPSHOT_DIR
    source = root / f"{round_index:03d}"
    if not source.is_dir():
        return False
    for name in ROUND_STATE_FILES:
        saved, current = source / name, Path(state_dir) / name
        if saved.is_file():
            shutil.copyfile(saved, current.with_name(f".{name}.restore"))
            os.replace(current.with_name(f".{name}.restore"), current)
        elif current.exists():
            current.unlink()
    for later in root.iterdir():
        if later.name.isdigit() and int(later.name) > round_index:
            shutil.rmtree(later)
    return True

"""A site's state folder (`state/<site>/` in a run folder, `--state` of `fedseg train`).

What stays at the site between rounds: the tensors the route table keeps local
(`local.safetensors`, this module), the optimizer and checkpoint of the trainer and its cache
of preprocessed cases (fedseg.training.trainer), and snapshots of the files a round started
from (`before_round/<r>/`), from which a run redoes a round.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedseg.atomic import atomic_path
from fedseg.errors import InputError
from fedseg.training.trainer import OPTIMIZER_FILE

LOCAL_STATE_FILE = "local.safetensors"
SNAPSHOT_DIR = "before_round"          # state/<site>/before_round/<r>/: the state files round r started from
# the files a round reads from the state folder and changes for the next one
ROUND_STATE_FILES = (LOCAL_STATE_FILE, OPTIMIZER_FILE)


def load_local_state(state_dir: Path) -> dict[str, torch.Tensor]:
    """The site's local tensors ({} before its first round)."""
    path = Path(state_dir) / LOCAL_STATE_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(f"cannot read local state ({exc})", path) from None


def save_local_state(state_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(state_dir) / LOCAL_STATE_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


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

"""Which round folder of a run a model comes from: `final`, `best` or `round_N` (nnU-Net's
`-chk checkpoint_final.pth | checkpoint_best.pth`)."""

from __future__ import annotations

import re
from pathlib import Path

from fedseg.errors import InputError
from fedseg.federation.best_round import BEST_DIR

CHECKPOINT_FINAL = "final"
CHECKPOINT_BEST = "best"
_ROUND = re.compile(r"round_(\d+)")
COMPLETE_MARKER = "aggregate.json"


def checkpoint_folder(run_dir: Path, checkpoint: str) -> Path:
    """The folder holding `<site>.safetensors` of `checkpoint` in `run_dir` (checked to exist)."""
    run_dir = Path(run_dir)
    if not (run_dir / "plans.json").is_file():
        raise InputError("not a run folder (no plans.json)", run_dir)
    if checkpoint == CHECKPOINT_FINAL:
        complete = sorted(
            int(m.group(1)) for p in run_dir.iterdir()
            if (m := _ROUND.fullmatch(p.name)) and (p / COMPLETE_MARKER).is_file()
        )
        if not complete:
            raise InputError("holds no complete round (no round_N/aggregate.json)", run_dir)
        return run_dir / f"round_{complete[-1]:03d}"
    if checkpoint == CHECKPOINT_BEST:
        folder = run_dir / BEST_DIR
        if not folder.is_dir():
            raise InputError("has no best/ folder yet (it appears once a round's updates report validation Dice)", run_dir)
        return folder
    match = _ROUND.fullmatch(checkpoint)
    if match is None:
        raise InputError(f"--checkpoint must be final, best or round_N, not {checkpoint!r}")
    folder = run_dir / f"round_{int(match.group(1)):03d}"
    if not folder.is_dir():
        raise InputError(f"has no {checkpoint}", run_dir)
    return folder


def site_model_file(run_dir: Path, checkpoint: str, site: str) -> Path:
    path = checkpoint_folder(run_dir, checkpoint) / f"{site}.safetensors"
    if not path.is_file():
        raise InputError(f"no model file for site {site!r}", path)
    return path

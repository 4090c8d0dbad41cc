"""Options shared by several commands, and small parsing helpers."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.data.voxel_limit import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError
from fedseg.federation.strategies import DEFAULT_STRATEGY, strategy_names
from fedseg.planning.settings import MAX_ITERATIONS_PER_ROUND, MAX_ROUNDS

QUIET = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.")
JSON = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout.")
# Every command that reads images: the header's declared size is checked before any voxel is read.
MAX_VOXELS = typer.Option(
    DEFAULT_MAX_VOXELS, "--max-voxels", min=1,
    help="Refuse an image whose header declares more voxels than this, before reading it "
         "(the default, 2^30, admits a 1024^3 volume; docs/security.md).",
)

# from the registry: the strategies import numpy only, so `--help` stays free of torch
STRATEGY_NAMES = tuple(strategy_names())
STRATEGY_HELP = f"Federation strategy: {', '.join(STRATEGY_NAMES)} (docs/strategies/)."
STRATEGY = typer.Option(DEFAULT_STRATEGY, "--strategy", help=STRATEGY_HELP)

# The options `fedseg simulate` and `fedseg flower simulate` share: one federation, two engines.
SITES_ROOT = typer.Argument(..., help="Folder holding one nnU-Net raw folder per site.")
ROUNDS = typer.Option(3, "--rounds", min=1, max=MAX_ROUNDS, help="Federated rounds.")
RUN_OUTPUT = typer.Option(..., "-o", "--output", help="Run folder (plans, rounds, report).")
CONFIGURATION = typer.Option("3d_fullres", "--config", help="Configuration: 3d_fullres or 2d.")
ITERATIONS = typer.Option(None, "--iterations", min=1, max=MAX_ITERATIONS_PER_ROUND, help="Training iterations per site per round.")
SET = typer.Option(None, "--set", help="Plan override or strategy parameter: key=value.")
SEED = typer.Option(1234, "--seed", help="Seed for weights and training.")
WORKERS = typer.Option(2, "--workers", min=0, help="Background augmentation workers per site.")
DEVICE = typer.Option(
    "auto", "--device",
    help="auto (a CUDA GPU when torch has one, else the CPU), cpu, cuda or cuda:N. On CUDA training uses mixed precision.",
)
PRECISION = typer.Option(
    "auto", "--precision",
    help="The network's arithmetic: auto (float16 mixed precision on CUDA, float32 on the CPU), fp32, or bf16 "
         "(bfloat16 mixed precision; several times faster on CPUs with AMX, docs/cli.md).",
)
BUDGET = typer.Option(
    None, "--budget",
    help="Compute budget for the patch size (nnU-Net GPU-memory gigabytes; default 0.8 suits a CPU, 8 is nnU-Net's GPU plan).",
)
RESUME = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its last complete round.")

# Which models of a run (fedseg.federation.checkpoints), as nnU-Net's -chk.
CHECKPOINT = typer.Option(
    "final", "--checkpoint",
    help="Which models of a run: final (the last complete round), best (best/: the round with the highest validation Dice) or round_N.",
)


def split_list_option(items: list[str] | None) -> list[str]:
    """Values of a repeatable option that also takes comma lists: `--fold 0,1 --fold 2` -> 0, 1, 2."""
    return [part.strip() for item in items or [] for part in item.split(",") if part.strip()]


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> dict, refusing malformed items."""
    overrides: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def require_output_file(path: Path, what: str) -> Path:
    """An output that will be a file: refused (exit 2) when it is a folder or sits below a file,
    checked before any work so a long run never fails at its last write."""
    if path.is_dir():
        raise InputError(f"{what} is a folder; give a file name", path)
    _require_folder_ancestors(path, what)
    return path


def require_output_dir(path: Path, what: str) -> Path:
    """An output that will be a folder (created if missing): refused (exit 2) when a file is in the way."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} is a file; give a folder", path)
    _require_folder_ancestors(path, what)
    return path


def _require_folder_ancestors(path: Path, what: str) -> None:
    # the nearest existing ancestor must be a folder, else creating the output fails
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot create {what} {path}: this is a file, not a folder", parent)
            return


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{what} not found (expected a folder)", path)
    return path


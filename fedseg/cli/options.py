"""Options shared by several commands, and small parsing helpers."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.errors import InputError

QUIET = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.")
JSON = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout.")

# Kept in sync with fedseg.federation.strategies (a unit test checks); spelled out here so
# that `--help` does not import the strategies and torch with them.
STRATEGY_NAMES = ("fedavg", "local", "asymfedavg", "flames", "mixmfl", "fedmsa", "fedsam")
STRATEGY_HELP = f"Federation strategy: {', '.join(STRATEGY_NAMES)} (docs/strategies/)."

# The options `fedseg simulate` and `fedseg flower simulate` share: one federation, two engines.
SITES_ROOT = typer.Argument(..., help="Folder holding one nnU-Net raw folder per site.")
ROUNDS = typer.Option(3, "--rounds", min=1, help="Federated rounds.")
RUN_OUTPUT = typer.Option(..., "-o", "--output", help="Run folder (plans, rounds, report).")
CONFIGURATION = typer.Option("3d_fullres", "--config", help="Configuration: 3d_fullres or 2d.")
ITERATIONS = typer.Option(None, "--iterations", min=1, help="Training iterations per site per round.")
SET = typer.Option(None, "--set", help="Plan override or strategy parameter: key=value.")
SEED = typer.Option(1234, "--seed", help="Seed for weights and training.")
WORKERS = typer.Option(2, "--workers", min=0, help="Background augmentation workers per site.")
DEVICE = typer.Option("cpu", "--device", help="cpu or cuda.")
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


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{what} not found (expected a folder)", path)
    return path

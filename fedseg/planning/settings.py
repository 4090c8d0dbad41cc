"""The plan's `--set` keys: each key's type and range, and the check every command shares.

Two families of keys:
- plan keys, read by the planner: `training.<field>`, `configuration.patch_size`,
  `configuration.batch_size`, `configuration.per_site` and `seed` (PLAN_SETTINGS below);
- strategy parameters (every other key): the engine's `robust`, `clip_norm`,
  `max_update_norm` and each strategy's own keys, which the strategy checks
  (fedseg.federation.strategies.base.Strategy.check_params) when the plan is made, at
  round 0, at every aggregation and before a site trains.

A misspelt key is refused with the closest known key (`unknown_key_message`), so a typo
never passes silently as a parameter nothing reads. docs/cli.md has the table for users.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fedseg.errors import InputError

# Upper bounds that only keep a typo from running for years or overflowing an integer:
# far beyond any real federation (nnU-Net trains 1000 epochs of 250 iterations).
MAX_ROUNDS = 100_000
MAX_ITERATIONS_PER_ROUND = 10_000_000
MAX_BATCH_SIZE = 4096
# torch.manual_seed and numpy's generators take any seed below 2^64; negatives are refused by numpy.
MAX_SEED = 2 ** 63 - 1
# A patch edge beyond 2^14 voxels exceeds every image nnU-Net plans for (its initial 2D patch
# is 2048); the finer bound is the compute budget (fedseg.planning.planner.check_compute).
MAX_PATCH_EDGE = 1 << 14
KNOWN_LOSSES = ("dice_ce", "dice_focal", "bce")   # the losses fedseg.training.losses.make_loss builds


@dataclass(frozen=True)
class Setting:
    """One `--set` key: what it accepts (`kind`, shown in errors and docs) and its check."""

    key: str
    kind: str
    check: Callable[[Any], Any]   # the value as the plan stores it, or ValueError

    def validate(self, value: Any, source: str = "--set ") -> Any:
        """The checked value; InputError "<source><key> must be <kind>, not <value>" otherwise."""
        try:
            return self.check(value)
        except (TypeError, ValueError, OverflowError):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise InputError(f"{source}{self.key} must be {self.kind}, not {shown}") from None


# -- value checks -----------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(value)
        return value
    return check


def number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], float]:
    """A finite number in the range; `*_open` excludes that end."""
    def check(value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(value)
        value = float(value)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise ValueError(value)
        return value
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(value)
        return value
    return check


def integer_list(value: Any) -> list[int]:
    """"64,64,64", [64, 64, 64] or 64 -> [64, 64, 64]-style list of edges in [1, MAX_PATCH_EDGE]."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [v for v in str(value).split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError(value)
    edges = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(item)
        text = str(item).strip()
        if not text.isdigit() or len(text) > 6:   # digits only: no sign, no 1e400
            raise ValueError(item)
        edge = int(text)
        if not 1 <= edge <= MAX_PATCH_EDGE:
            raise ValueError(item)
        edges.append(edge)
    return edges


# Folds beyond 100 would mean more federations than any site has cases to validate on.
MAX_FOLDS = 100


PLAN_SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("training.rounds", f"an integer in [1, {MAX_ROUNDS}]", integer(1, MAX_ROUNDS)),
        Setting("training.iterations_per_round", f"an integer in [1, {MAX_ITERATIONS_PER_ROUND}]",
                integer(1, MAX_ITERATIONS_PER_ROUND)),
        Setting("training.initial_lr", "a number in (0, 10]", number(0.0, 10.0, low_open=True)),
        Setting("training.weight_decay", "a number in [0, 1]", number(0.0, 1.0)),
        Setting("training.momentum", "a number in [0, 1]", number(0.0, 1.0)),
        Setting("training.loss", f"one of {', '.join(KNOWN_LOSSES)}", choice(*KNOWN_LOSSES)),
        Setting("training.oversample_foreground_percent", "a number in [0, 1]", number(0.0, 1.0)),
        # cross-validation folds of each site's cases (nnU-Net: 5); at most one case per fold is practical
        Setting("training.n_folds", f"an integer in [2, {MAX_FOLDS}]", integer(2, MAX_FOLDS)),
        Setting("configuration.patch_size", f"positive integers like 64,64,64 (each at most {MAX_PATCH_EDGE})",
                integer_list),
        Setting("configuration.batch_size", f"an integer in [1, {MAX_BATCH_SIZE}]", integer(1, MAX_BATCH_SIZE)),
        Setting("configuration.per_site", "true or false", boolean),
        Setting("seed", f"an integer in [0, {MAX_SEED}]", integer(0, MAX_SEED)),
    )
}


def unknown_key_message(key: str, known: Iterable[str], reader: str = "the planner") -> str:
    """"the planner does not know --set key 'training.round' (did you mean 'training.rounds'?)"."""
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known) or 'none'}"
    return f"{reader} does not know --set key {key!r} ({hint})"

"""Robust combiners: options of the engine, orthogonal to the strategy.

Set in the plan (so every site knows the rule, and plan_id covers it):

- `robust=median`        coordinate-wise median of the contributions (Yin et al., 2018);
- `robust=trimmed:F`     coordinate-wise trimmed mean: per coordinate drop the floor(F·n)
                         smallest and largest values, average the rest (0 <= F < 0.5);
- `clip_norm=X`          before combining, each site's update delta (its weights minus the
                         model it started the round from) is scaled down to L2 norm X when
                         it is longer (norm clipping; the norm is over all tensors the site sends).

`robust` replaces the merge of every pool that the strategy merges by a weighted mean (its
`pool_weights` is not None). A strategy declares which rules keep its meaning
(`Strategy.robust_rules`) and the others are refused when the plan is made: FLAMES' median of
a group would be one model for every site of it (no longer personal), MixMFL's memories are
merged by concatenation. `clip_norm` changes the contributions, not the rule. Median and trimmed mean ignore n_cases on purpose: a weight a site reports itself
is exactly what a malicious site would inflate.

Memory: the median and the trimmed mean need every contribution of a coordinate at once;
they work through a tensor in blocks, so the extra memory is O(sites x block), and the
engine still holds one tensor per site for one key at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedseg.errors import InputError

RULES = ("mean", "median", "trimmed")
ROBUST_PARAMS = frozenset({"robust", "clip_norm"})
# Coordinates per block: 16 Ki values x sites x 8 bytes (float64) stays in L2 for ~10 sites.
_BLOCK = 1 << 14


@dataclass(frozen=True)
class RobustSpec:
    rule: str = "mean"                 # "mean": the strategy's own rule
    trim: float = 0.0                  # fraction cut at each end ("trimmed")
    clip_norm: float | None = None

    @property
    def replaces_combine(self) -> bool:
        return self.rule != "mean"

    @property
    def active(self) -> bool:
        return self.replaces_combine or self.clip_norm is not None

    def describe(self) -> str:
        rule = {"mean": "strategy rule", "median": "coordinate median", "trimmed": f"trimmed mean {self.trim:g}"}[self.rule]
        return rule + (f", clip_norm {self.clip_norm:g}" if self.clip_norm is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "trim": self.trim, "clip_norm": self.clip_norm}


def parse_robust(params: Mapping[str, Any]) -> RobustSpec:
    """RobustSpec from plans.strategy.params; InputError on a malformed value."""
    value = params.get("robust")
    rule, trim = "mean", 0.0
    if value is not None:
        if value == "mean":
            # "mean" is no rule of its own: leaving `robust` out keeps the strategy's rule (for
            # fedavg a weighted mean, for flames a personalised mixture), which "mean" misnames.
            raise InputError("robust=mean is not a robust rule; leave robust out to keep the strategy's own rule, "
                             "or use median or trimmed:F (0 <= F < 0.5)")
        if not isinstance(value, str):
            raise InputError(f"robust must be median or trimmed:F (0 <= F < 0.5), got {value!r}")
        name, _, fraction = value.partition(":")
        if name == "median" and not fraction:
            rule = "median"
        elif name == "trimmed":
            try:
                trim = float(fraction) if fraction else 0.1
            except ValueError:
                trim = math.nan
            if not 0.0 <= trim < 0.5:
                raise InputError(f"robust=trimmed:F needs 0 <= F < 0.5, got {value!r}")
            rule = "trimmed"
        else:
            raise InputError(f"robust must be median or trimmed:F (0 <= F < 0.5), got {value!r}")
    bound = params.get("clip_norm")
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0 or not math.isfinite(bound)):
        raise InputError(f"clip_norm must be a positive number, got {bound!r}")
    return RobustSpec(rule=rule, trim=trim, clip_norm=None if bound is None else float(bound))


def trim_count(n: int, fraction: float) -> int:
    """Values cut at each end; always leaves at least one."""
    return min(int(math.floor(fraction * n)), (n - 1) // 2)


def robust_combine(spec: RobustSpec, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median or trimmed mean of same-shaped arrays, in float64."""
    if not arrays:
        raise ValueError("nothing to combine")
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError("contributions to one key differ in shape")
    flats = [a.reshape(-1) for a in arrays]
    n = len(flats)
    out = np.empty(flats[0].size, dtype=np.float64)
    stack = np.empty((n, min(out.size, _BLOCK)), dtype=np.float64)
    cut = trim_count(n, spec.trim) if spec.rule == "trimmed" else 0
    for start in range(0, out.size, _BLOCK):
        block = stack[:, : min(_BLOCK, out.size - start)]
        for row, flat in zip(block, flats):
            row[...] = flat[start:start + block.shape[1]]
        if spec.rule == "median":
            out[start:start + block.shape[1]] = np.median(block, axis=0)
        elif spec.rule == "trimmed":
            block.sort(axis=0)
            out[start:start + block.shape[1]] = block[cut:n - cut].mean(axis=0)
        else:
            raise ValueError(f"rule {spec.rule!r} is the strategy's own")
    return out.reshape(shape)


def delta_sumsq(current: np.ndarray, previous: np.ndarray) -> float:
    """Σ (current - previous)² in float64, blockwise (no full-size temporary)."""
    a, b = current.reshape(-1), previous.reshape(-1)
    total = 0.0
    for start in range(0, a.size, _BLOCK):
        d = a[start:start + _BLOCK].astype(np.float64) - b[start:start + _BLOCK]
        total += float(np.dot(d, d))
    return total


def clip_factor(delta_norm: float, bound: float | None) -> float:
    """Scale applied to an update delta: 1 when within the bound, bound/norm when longer."""
    if bound is None or delta_norm <= bound:
        return 1.0
    return bound / delta_norm


def clipped(current: np.ndarray, previous: np.ndarray, factor: float) -> np.ndarray:
    """previous + factor·(current − previous), in float64 (the input itself when factor is 1)."""
    if factor == 1.0:
        return current
    prev = np.asarray(previous, dtype=np.float64)
    return prev + factor * (np.asarray(current, dtype=np.float64) - prev)


class ClippedTensor:
    """A site's clipped contribution to one key, computed block by block when it is read.

    Materialising previous + factor·(current − previous) for every site of a key would hold
    one float64 copy of the key per site at once (O(sites x model)); this keeps only the two
    memory-mapped inputs and computes the slice asked for. The combiners read contributions
    as `.shape`, `.size`, `.reshape(-1)` and slices `flat[a:b]` (weighted_mean,
    robust_combine), so a weighted or robust mean over clipped updates stays O(block) per
    site; `np.asarray` materialises one site's clipped key (a personalised result needs it).
    """

    dtype = np.dtype(np.float64)

    def __init__(self, current: np.ndarray, previous: np.ndarray, factor: float) -> None:
        if current.shape != previous.shape:
            raise ValueError(f"clipping needs equal shapes, got {current.shape} and {previous.shape}")
        self.current, self.previous, self.factor = current, previous, float(factor)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.current.shape

    @property
    def size(self) -> int:
        return int(self.current.size)

    @property
    def ndim(self) -> int:
        return self.current.ndim

    def __len__(self) -> int:
        return len(self.current)

    def reshape(self, *shape: Any) -> ClippedTensor:
        return ClippedTensor(self.current.reshape(*shape), self.previous.reshape(*shape), self.factor)

    def __getitem__(self, index: Any) -> np.ndarray:
        return clipped(self.current[index], self.previous[index], self.factor)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = clipped(self.current, self.previous, self.factor)
        return full if dtype is None else full.astype(dtype, copy=False)

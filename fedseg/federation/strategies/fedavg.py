"""FedAvg: one global model, every float parameter averaged, weighted by the sites' case counts.

w' = Σ_k n_k w_k / Σ_k n_k — the same rule as Flower's `aggregate()`, but accumulated in
float64 (Flower multiplies and sums in the tensors' own dtype, float32). Set
`weighting=uniform` (`fedseg plan --set weighting=uniform`) for an unweighted mean.
`missing=zero` admits sites that hold different subsets of channels (mix-modal MRI): every
site's input has all of the plan's channels, the absent ones zero-filled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.strategies.base import Contribution, Strategy, weighted_mean

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

GLOBAL_POOL = "global"
WEIGHTINGS = ("n_cases", "uniform")
MISSING_MODES = ("zero",)


class FedAvg(Strategy):
    name = "fedavg"
    description = "one global model; weighted mean by n_cases (Flower's aggregate)"
    known_params = frozenset({"weighting", "missing"})

    def check_params(self, params: Mapping[str, Any]) -> None:
        super().check_params(params)
        weighting = params.get("weighting", "n_cases")
        if weighting not in WEIGHTINGS:
            raise InputError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        missing = params.get("missing")
        if missing is not None and missing not in MISSING_MODES:
            raise InputError(f"missing must be one of {', '.join(MISSING_MODES)}, got {missing!r}")

    def requires_same_channels(self, params: Mapping[str, Any]) -> bool:
        # `missing=zero`: sites may hold different subsets of channels; the network sees the
        # plan's channels with the absent ones zero (the mix-modal FedAvg baseline).
        return params.get("missing") != "zero"

    def scope(self, plans: Plans, site: str, name: str) -> str | None:
        return GLOBAL_POOL

    def model_pools(self, plans: Plans) -> list[str]:
        return [GLOBAL_POOL]

    def pool_weights(self, plans: Plans, pool: str, contributions: Sequence[Contribution]) -> dict[str, float]:
        return case_weights(plans, contributions)

    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float:
        return case_weight(plans, n_cases)

    def combine(self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution]) -> np.ndarray:
        weights = self.pool_weights(plans, pool, contributions)
        return weighted_mean(contributions, [weights[c.site] for c in contributions])


def case_weight(plans: Plans, n_cases: int) -> float:
    """A site's unnormalised FedAvg weight: its case count, or 1 with `weighting=uniform`."""
    return 1.0 if plans.strategy.params.get("weighting", "n_cases") == "uniform" else float(n_cases)


def case_weights(plans: Plans, contributions: Sequence[Contribution]) -> dict[str, float]:
    """FedAvg's weights: each site's share of the cases, or equal shares with `weighting=uniform`."""
    raw = [case_weight(plans, c.n_cases) for c in contributions]
    total = sum(raw)
    return {c.site: w / total for c, w in zip(contributions, raw)}

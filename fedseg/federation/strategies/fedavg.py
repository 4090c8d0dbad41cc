"""FedAvg: one global model, every float parameter averaged, weighted by the sites' case counts.

w' = Σ_k n_k w_k / Σ_k n_k — the same rule as Flower's `aggregate()`, but accumulated in
float64 (Flower multiplies and sums in the tensors' own dtype, float32). Set
`weighting=uniform` (`fedseg plan --set weighting=uniform`) for an unweighted mean.
`missing=zero` admits sites that hold different subsets of channels (mix-modal MRI): every
site's input has all of the plan's channels, the absent ones zero-filled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedseg.errors import InputError
from fedseg.federation.strategies.base import Manifest, ProposedRoutes, Strategy, case_weight, every_tensor_to

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

    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        return ProposedRoutes(every_tensor_to(manifests, lambda site: GLOBAL_POOL), model_pools=frozenset({GLOBAL_POOL}))

    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float:
        return case_weight(plans.strategy.params, n_cases)

"""FedAvg: one global model, every float parameter averaged, weighted by the sites' case counts.

w' = Σ_k n_k w_k / Σ_k n_k — the same rule as Flower's `aggregate()`, but accumulated in
float64 (Flower multiplies and sums in the tensors' own dtype, float32). Set
`weighting=uniform` (`fedseg plan --set weighting=uniform`) for an unweighted mean.
`missing=zero` admits sites that hold different subsets of channels (mix-modal MRI): every
site's input has all of the plan's channels, the absent ones zero-filled.
"""

from __future__ import annotations

from fedseg.federation.strategies.base import GLOBAL_POOL, GlobalMean


class FedAvg(GlobalMean):
    name = "fedavg"
    description = "one global model; weighted mean by n_cases (Flower's aggregate)"


__all__ = ["GLOBAL_POOL", "FedAvg"]

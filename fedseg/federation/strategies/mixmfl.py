"""MDM-MixMFL: mix-modal federated learning with modality decoupling and a modality memory.

Every site holds a subset of the federation's MRI sequences (plans.channel_names is the
union, plans.sites[s].channels a site's subset). The network (fedseg.training.mixmfl_network)
has one modality-tailored encoder per sequence, a modality-shared encoder, a decoupler and a
shared decoder, plus one prototype memory per sequence and encoder stage. Where each tensor goes:

- `tailored.<seq>.*`  -> pool "group:<seq>": averaged over the sites that hold the sequence,
                         unweighted as in the paper (Σ m_i w_i / Σ m_i, m_i = 1 when site i
                         holds it); `tailored_weighting=n_cases` weights by case count
                         (Σ m_i n_i w_i / Σ m_i n_i). A site without the sequence keeps its
                         (unused) copy local.
                         `tailored=false` (ablation "w/o tailored updating"): one "global" pool
                         over all sites, as plain FedAvg would average them;
- `shared.*`, `fuse.*`, `decoder.*`, `decoupler.*` -> "global" (all sites, weights n_cases);
- `memory.<seq>.<s>`  -> pool "memory:<seq>" (one memory per encoder stage s), each merged
                         by concatenation + FIFO truncation
                         (fedseg.training.prototype_memory.fifo_merge): every site receives the
                         merged memories; `memory=false`: memories stay local and unused.

Strategy params (`fedseg plan --set key=value`): tailored, memory, triplet, classifier (true/
false: the paper's ablation switches), lambda_cls (0.5), lambda_triplet (1e-4),
triplet_margin (1.0), memory_size (200), prototypes (k-means centres per sequence, stage,
key space, site and round: 16), tailored_weighting (uniform | n_cases).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedseg.federation.strategies.base import GLOBAL_POOL, Contribution, Manifest, ProposedRoutes, Strategy
from fedseg.training.prototype_memory import fifo_merge
from fedseg.training.recipes.params import MixMFLParams, present_indices, sequence_keys, sequences
from fedseg.typed_params import param, parse_params

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

TAILORED_PREFIX = "group:"
MEMORY_PREFIX = "memory:"
TAILORED_WEIGHTINGS = ("uniform", "n_cases")


@dataclass(frozen=True)
class MixMFLRuleParams:
    """The aggregation rule's own keys (the network's and trainer's: MixMFLParams)."""

    tailored: bool = param(True)     # tailored encoders averaged over their sequence's holders
    # the paper's Σ m_i w_i / Σ m_i; n_cases: by case count
    tailored_weighting: str = param("uniform", choices=TAILORED_WEIGHTINGS)


class MixMFL(Strategy):
    name = "mixmfl"
    description = "mix-modal: per-sequence tailored encoders (averaged over holders), shared encoder/decoder, prototype memory"
    Params = MixMFLRuleParams
    recipe = "mixmfl"

    # The memory pools are merged by concatenation and FIFO truncation, not by a weighted mean:
    # a median of prototype banks, or a delta clipped toward last round's bank, means nothing.
    robust_rules = frozenset()
    robust_refusal = "its prototype memories are merged by concatenation, which a median, trimmed mean or clipped delta would corrupt"

    # -- where parameters go (plan time) --------------------------------------------------
    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        routes = {site: {} for site in manifests}
        for site, manifest in manifests.items():
            for name in manifest:
                pool = self._pool(plans, site, name)
                if pool is not None:
                    routes[site][name] = (pool, name)
        used = {pool for entries in routes.values() for pool, _key in entries.values()}
        return ProposedRoutes(routes, model_pools=frozenset(p for p in used if not p.startswith(MEMORY_PREFIX)))

    def _pool(self, plans: Plans, site: str, name: str) -> str | None:
        head, _, rest = name.partition(".")
        if head == "tailored":
            key = rest.partition(".")[0]
            if not self.rule_params(plans).tailored:
                return GLOBAL_POOL
            index = sequence_keys(plans).index(key)
            if index not in present_indices(plans, site):
                return None     # never trained here: its holders' average must not be diluted
            return TAILORED_PREFIX + sequences(plans)[index]
        if head == "memory":
            if not parse_params(MixMFLParams, plans.strategy.params).memory:
                return None
            key = rest.partition(".")[0]            # memory.<seq>.<stage>
            return MEMORY_PREFIX + sequences(plans)[sequence_keys(plans).index(key)]
        return GLOBAL_POOL

    # -- merging -----------------------------------------------------------------------
    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float | None:
        # the weight a site gives its masked contribution: the same rule as `pool_weights`
        if pool.startswith(MEMORY_PREFIX):
            return None
        if pool.startswith(TAILORED_PREFIX) and self.rule_params(plans).tailored_weighting == "uniform":
            return 1.0
        return float(n_cases)

    def combine(self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution]) -> np.ndarray:
        if pool.startswith(MEMORY_PREFIX):
            ordered = sorted(contributions, key=lambda c: c.site)
            return fifo_merge([c.array for c in ordered], capacity=ordered[0].array.shape[0])
        return super().combine(plans, pool, key, contributions)

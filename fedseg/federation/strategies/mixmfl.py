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
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import InputError
from fedseg.data.channels import channel_keys, plan_channel_list, present_channels
from fedseg.federation.strategies.base import Contribution, Manifest, ProposedRoutes, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

GLOBAL_POOL = "global"
TAILORED_PREFIX = "group:"
MEMORY_PREFIX = "memory:"

DEFAULTS: dict[str, Any] = {
    "tailored": True,
    "memory": True,
    "triplet": True,
    "classifier": True,
    "lambda_cls": 0.5,          # the paper's λ1
    "lambda_triplet": 1e-4,     # the paper's λ2
    "triplet_margin": 1.0,
    "memory_size": 200,         # the paper's memory size per modality
    "prototypes": 16,
    "memory_query": "both",     # key spaces a site queries: both, tailored, shared
    "tailored_weighting": "uniform",   # the paper's Σ m_i w_i / Σ m_i; n_cases: by case count
}
TAILORED_WEIGHTINGS = ("uniform", "n_cases")
_SWITCHES = ("tailored", "memory", "triplet", "classifier")


def mixmfl_params(plans: Plans) -> dict[str, Any]:
    """The plan's mixmfl params with defaults filled in."""
    return {**DEFAULTS, **{k: v for k, v in plans.strategy.params.items() if k in DEFAULTS}}


def sequences(plans: Plans) -> list[str]:
    return plan_channel_list(plans.channel_names)


def sequence_keys(plans: Plans) -> list[str]:
    return channel_keys(sequences(plans))


def present_indices(plans: Plans, site: str) -> list[int]:
    return present_channels(sequences(plans), plans.site(site).channels)


class MixMFL(Strategy):
    name = "mixmfl"
    description = "mix-modal: per-sequence tailored encoders (averaged over holders), shared encoder/decoder, prototype memory"
    known_params = frozenset(DEFAULTS)
    recipe = "mixmfl"

    # The memory pools are merged by concatenation and FIFO truncation, not by a weighted mean:
    # a median of prototype banks, or a delta clipped toward last round's bank, means nothing.
    robust_rules = frozenset()
    robust_refusal = "its prototype memories are merged by concatenation, which a median, trimmed mean or clipped delta would corrupt"

    def check_params(self, params: Mapping[str, Any]) -> None:
        super().check_params(params)
        for key in _SWITCHES:
            if key in params and not isinstance(params[key], bool):
                raise InputError(f"{key} must be true or false, got {params[key]!r}")
        for key in ("lambda_cls", "lambda_triplet", "triplet_margin"):
            value = params.get(key, DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise InputError(f"{key} must be a number >= 0, got {value!r}")
        from fedseg.training.prototype_memory import MEMORY_QUERIES

        if params.get("memory_query", DEFAULTS["memory_query"]) not in MEMORY_QUERIES:
            raise InputError(f"memory_query must be one of {', '.join(MEMORY_QUERIES)}, got {params['memory_query']!r}")
        if params.get("tailored_weighting", DEFAULTS["tailored_weighting"]) not in TAILORED_WEIGHTINGS:
            raise InputError(f"tailored_weighting must be one of {', '.join(TAILORED_WEIGHTINGS)}, "
                             f"got {params['tailored_weighting']!r}")
        for key in ("memory_size", "prototypes"):
            value = params.get(key, DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")

    def requires_same_channels(self, params: Mapping[str, Any]) -> bool:
        return False

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
            params = mixmfl_params(plans)
            if not params["tailored"]:
                return GLOBAL_POOL
            index = sequence_keys(plans).index(key)
            if index not in present_indices(plans, site):
                return None     # never trained here: its holders' average must not be diluted
            return TAILORED_PREFIX + sequences(plans)[index]
        if head == "memory":
            if not mixmfl_params(plans)["memory"]:
                return None
            key = rest.partition(".")[0]            # memory.<seq>.<stage>
            return MEMORY_PREFIX + sequences(plans)[sequence_keys(plans).index(key)]
        return GLOBAL_POOL

    # -- merging -----------------------------------------------------------------------
    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float | None:
        # the weight a site gives its masked contribution: the same rule as `pool_weights`
        if pool.startswith(MEMORY_PREFIX):
            return None
        if pool.startswith(TAILORED_PREFIX) and mixmfl_params(plans)["tailored_weighting"] == "uniform":
            return 1.0
        return float(n_cases)

    def combine(self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution]) -> np.ndarray:
        if pool.startswith(MEMORY_PREFIX):
            from fedseg.training.prototype_memory import fifo_merge

            ordered = sorted(contributions, key=lambda c: c.site)
            return fifo_merge([c.array for c in ordered], capacity=ordered[0].array.shape[0])
        return super().combine(plans, pool, key, contributions)

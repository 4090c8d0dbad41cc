"""Local training only: nothing leaves a site (every scope None). The no-federation baseline.

`fedseg aggregate` still runs, checks the (tensor-free) updates and writes one tensor-free
model file per site, so the round folders look the same as for every other strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedseg.federation.strategies.base import Manifest, ProposedRoutes, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


class Local(Strategy):
    name = "local"
    description = "no federation: every site trains its own model, nothing is exchanged"
    engine_params = frozenset()
    robust_rules = frozenset()
    robust_refusal = "every site trains alone and nothing is aggregated"

    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        return ProposedRoutes({site: {} for site in manifests})

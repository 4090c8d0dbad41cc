"""The one way a plan is assembled from the sites' fingerprints: `fedseg plan` and `simulate` both call
`build_plans`, so a plan made by hand and one made by a simulation follow the same steps in the same order.

It is the plan-time half of the protocol that needs the networks (torch): the strategy's model
recipe builds each configuration's network once, on torch's meta device, to record its
parameter manifest; the strategy then routes every tensor (fedseg.federation.routes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedseg.federation.manifest import MANIFESTS_KEY, build_manifest, configuration_name
from fedseg.federation.privacy import check_privacy_plan
from fedseg.federation.quorum import required_sites
from fedseg.federation.routes import attach_routes
from fedseg.federation.signing import check_plan_keys
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.base import Strategy
from fedseg.planning.overrides import final_strategy_params
from fedseg.planning.planner import make_plans
from fedseg.planning.strategy_traits import StrategyTraits
from fedseg.training.recipes.registry import get_recipe
from fedseg.training.recipes.traits import recipe_traits

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


def strategy_traits(strategy: Strategy, params: Mapping[str, Any]) -> StrategyTraits:
    """What planning takes from `strategy` and its model recipe, given the plan's final
    strategy `params`: per-site plans are the rule's; region labels and training defaults
    the recipe's; sites may hold different channels when the rule (e.g. a `missing=zero`
    mode) or the recipe (a mix-modal network) says so."""
    recipe = recipe_traits(strategy.recipe)
    return StrategyTraits(
        name=strategy.name,
        plans_per_site=bool(strategy.plans_per_site),
        requires_same_channels=bool(strategy.requires_same_channels(params)) and recipe.requires_same_channels,
        supports_regions=recipe.supports_regions,
        training_defaults=dict(recipe.training_defaults),
    )


def build_plans(
    fingerprints: Sequence[dict],
    *,
    strategy: str,
    configuration: str,
    overrides: Mapping[str, str],
    seed: int,
    budget: float | None = None,
    fingerprint_names: Sequence[str] | None = None,
    adopt: Callable[[Plans], Plans] | None = None,
    keys: Mapping[str, str] | None = None,
) -> Plans:
    """Plan (nnU-Net rules, `--set` overrides), then `adopt` (e.g. an nnU-Net model's
    configuration), then the sites' public keys (`keys`: site -> key; every site needs one),
    then the manifests and the route table, then the privacy options' consistency. Writes nothing.

    The sites' key-agreement keys (secure aggregation) are not attached here: `fedseg plan`
    reads them from --keys, `simulate` makes them in the run folder (`plan_privacy`).
    """
    impl = get_strategy(strategy)
    traits = strategy_traits(impl, final_strategy_params(overrides))
    plans = make_plans(fingerprints, strategy=strategy, configuration=configuration, budget=budget,
                       overrides=overrides, seed=seed, fingerprint_names=fingerprint_names, traits=traits)
    if adopt is not None:
        plans = adopt(plans)
    if keys is not None:
        plans.keys = dict(keys)
        check_plan_keys(plans.keys, sorted(plans.sites))
    plans = attach_manifests(plans, impl)
    check_privacy_plan(plans, impl, keys=False)   # an impossible privacy combination, before any key is made
    return plans


def attach_manifests(plans: Plans, strategy: Strategy | None = None) -> Plans:
    """A copy of `plans` with a manifest for every configuration used by its sites and the
    route table the strategy makes from them.

    Networks are built by the strategy's recipe on torch's meta device (shapes only, no
    memory, no init cost); a network whose construction needs real tensors falls back to the CPU.
    """
    strategy = strategy or get_strategy(plans.strategy.name)
    # the same check as round 0, aggregation and training: a plan they would refuse is never written
    strategy.check_params(plans.strategy.params)
    required_sites(plans)   # min_sites above the number of sites: refused at plan time
    recipe = get_recipe(strategy.recipe)
    manifests: dict[str, dict[str, Any]] = {}
    for site in sorted(plans.sites):
        config = configuration_name(plans, site)
        if config in manifests:
            continue
        try:
            with torch.device("meta"):
                network = recipe.network(plans, site)
        except (RuntimeError, NotImplementedError, TypeError):
            network = recipe.network(plans, site)
        manifests[config] = build_manifest(network.state_dict())
    plans = dataclasses.replace(plans, extra={**plans.extra, MANIFESTS_KEY: manifests})
    return attach_routes(plans, strategy)

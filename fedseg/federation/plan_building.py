"""The one way a plan is assembled from the sites' fingerprints: `fedseg plan` and `simulate` both call
`build_plans`, so a plan made by hand and one made by a simulation follow the same steps in the same order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedseg.federation.manifest import attach_manifests
from fedseg.federation.privacy import check_privacy_plan
from fedseg.federation.signing import check_plan_keys
from fedseg.federation.strategies import Strategy, get_strategy
from fedseg.planning.overrides import final_strategy_params
from fedseg.planning.planner import make_plans
from fedseg.planning.strategy_traits import StrategyTraits

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


def strategy_traits(strategy: Strategy, params: Mapping[str, Any]) -> StrategyTraits:
    """What planning takes from `strategy`, given the plan's final strategy `params` (whether
    sites must hold the same channels may depend on them, e.g. a `missing=zero` mode)."""
    return StrategyTraits(
        name=strategy.name,
        plans_per_site=bool(getattr(strategy, "plans_per_site", False)),
        requires_same_channels=bool(strategy.requires_same_channels(params)),
        supports_regions=bool(strategy.supports_regions),
        training_defaults=dict(getattr(strategy, "training_defaults", None) or {}),
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
    then the strategy's manifests, then the privacy options' consistency. Writes nothing.

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

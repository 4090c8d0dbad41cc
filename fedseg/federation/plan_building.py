"""The one way a plan is assembled from the sites' fingerprints: `fedseg plan` and `simulate` both call
`build_plans`, so a plan made by hand and one made by a simulation follow the same steps in the same order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


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
    # torch-free but heavy modules: imported on use, like every library call of the CLI
    from fedseg.federation.manifest import attach_manifests
    from fedseg.federation.privacy import check_privacy_plan
    from fedseg.federation.signing import check_plan_keys
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.planner import make_plans

    impl = get_strategy(strategy)
    plans = make_plans(fingerprints, strategy=strategy, configuration=configuration, budget=budget,
                       overrides=overrides, seed=seed, fingerprint_names=fingerprint_names)
    if adopt is not None:
        plans = adopt(plans)
    if keys is not None:
        plans.keys = dict(keys)
        check_plan_keys(plans.keys, sorted(plans.sites))
    plans = attach_manifests(plans, impl)
    check_privacy_plan(plans, impl, keys=False)   # an impossible privacy combination, before any key is made
    return plans

"""Parameter manifests: each configuration's tensor names, shapes and dtypes, stored in the plan.

`fedseg plan` records them (`attach_manifests`) so that `fedseg aggregate` can check every
update against what the network really has without importing torch or building a network.
Layout: plans.extra["manifests"][<configuration name>] = {name: {"shape": [...], "dtype": "float32"}}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedseg.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.federation.strategies.base import Strategy
    from fedseg.planning.plans import Plans

MANIFESTS_KEY = "manifests"


def dtype_name(tensor: Any) -> str:
    """numpy-style dtype name of a numpy array or torch tensor ("float32", "int64", "bool")."""
    text = str(tensor.dtype)
    return text.removeprefix("torch.")


def build_manifest(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: {"shape": [...], "dtype": "..."}} in state-dict order (torch tensors or numpy arrays)."""
    return {
        name: {"shape": [int(s) for s in tensor.shape], "dtype": dtype_name(tensor)}
        for name, tensor in state_dict.items()
    }


def configuration_name(plans: Plans, site: str) -> str:
    info = plans.site(site)
    return info.configuration or plans.default_configuration


def expected_parameters(plans: Plans, site: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of every tensor in `site`'s network, as recorded in the plan."""
    config = configuration_name(plans, site)
    manifests = plans.extra.get(MANIFESTS_KEY)
    if not isinstance(manifests, dict) or config not in manifests:
        raise InputError(
            f"the plan has no parameter manifest for configuration {config!r} (re-run `fedseg plan` with this fedseg version)"
        )
    manifest = manifests[config]
    try:
        return {name: (tuple(int(s) for s in e["shape"]), str(e["dtype"])) for name, e in manifest.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise InputError(f"the plan's parameter manifest for configuration {config!r} is malformed") from None


def attach_manifests(plans: Plans, strategy: Strategy | None = None) -> Plans:
    """A copy of `plans` with a manifest for every configuration used by its sites, plus the
    strategy's `planned_extra` (which may depend on the manifests).

    Networks are built on torch's meta device (shapes only, no memory, no init cost); a
    network whose construction needs real tensors falls back to the CPU.
    """
    import torch

    from fedseg.federation.quorum import required_sites
    from fedseg.federation.strategies import get_strategy

    strategy = strategy or get_strategy(plans.strategy.name)
    # the same check as round 0, aggregation and training: a plan they would refuse is never written
    strategy.check_params(plans.strategy.params)
    required_sites(plans)   # min_sites above the number of sites: refused at plan time
    manifests: dict[str, dict[str, Any]] = {}
    for site in sorted(plans.sites):
        config = configuration_name(plans, site)
        if config in manifests:
            continue
        try:
            with torch.device("meta"):
                network = strategy.network(plans, site)
        except (RuntimeError, NotImplementedError, TypeError):
            network = strategy.network(plans, site)
        manifests[config] = build_manifest(network.state_dict())
    plans = dataclasses.replace(plans, extra={**plans.extra, MANIFESTS_KEY: manifests})
    # strategy data that depends on the parameter shapes (computed from the manifests just made)
    return dataclasses.replace(plans, extra={**plans.extra, **strategy.planned_extra(plans)})

"""Parameter manifests: each configuration's tensor names, shapes and dtypes, stored in the plan.

`fedseg plan` records them (fedseg.federation.plan_building) so that `fedseg aggregate` can check every
update against what the network really has without importing torch or building a network.
Layout: plans.extra["manifests"][<configuration name>] = {name: {"shape": [...], "dtype": "float32"}}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedseg.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
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

"""Strategy registry: one module per strategy, looked up by the name stored in plans.json."""

from __future__ import annotations

from fedseg.errors import InputError
from fedseg.federation.strategies.asymfedavg import AsymFedAvg
from fedseg.federation.strategies.base import Contribution, Strategy
from fedseg.federation.strategies.fedavg import FedAvg
from fedseg.federation.strategies.fedfms import FedMSA, FedSAM
from fedseg.federation.strategies.flames import Flames
from fedseg.federation.strategies.local import Local
from fedseg.federation.strategies.mixmfl import MixMFL

# name -> class; a fresh instance per lookup (strategies are stateless: all input comes
# through arguments, so one instance could be shared, but nothing forces callers to know that).
_REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, Flames, Local, FedMSA, FedSAM, AsymFedAvg, MixMFL)}


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def strategies_knowing(key: str) -> list[str]:
    """Names of the strategies that read parameter `key` (e.g. "group.site_a": flames)."""
    return [name for name in strategy_names() if _REGISTRY[name]().knows_param(key)]


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise InputError(f"unknown strategy {name!r} (known: {', '.join(strategy_names())})") from None


__all__ = ["Contribution", "Strategy", "get_strategy", "strategy_names"]

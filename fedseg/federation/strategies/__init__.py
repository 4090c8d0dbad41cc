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
_BUILT_IN: tuple[type[Strategy], ...] = (FedAvg, Flames, Local, FedMSA, FedSAM, AsymFedAvg, MixMFL)
_REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in _BUILT_IN}
DEFAULT_STRATEGY = FedAvg.name


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def strategies_knowing(key: str) -> list[str]:
    """Names of the strategies that read parameter `key` (e.g. "group.site_a": flames)."""
    return [name for name in strategy_names() if _REGISTRY[name]().knows_param(key)]


# the base class names the owner of a parameter given to the wrong strategy from this registry
Strategy.param_owners = staticmethod(strategies_knowing)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Make `cls` available under `cls.name` to plans and every command of this process; returns
    `cls` (usable as a class decorator). A strategy defined outside this package registers
    itself this way (docs/architecture.md, "How to add a strategy"); the built-in ones are
    listed above. Refuses a name that is empty, not a file-name-safe word, or taken."""
    name = getattr(cls, "name", "")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"{cls!r} is not a Strategy subclass")
    if not name or not name.isascii() or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"strategy name must be a lower-case word (letters, digits, _), not {name!r}")
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"strategy name {name!r} is taken by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def unregister_strategy(name: str) -> None:
    """Undo `register_strategy` (a built-in strategy cannot be removed)."""
    if name in {cls.name for cls in _BUILT_IN}:
        raise ValueError(f"{name!r} is a built-in strategy")
    _REGISTRY.pop(name, None)


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise InputError(f"unknown strategy {name!r} (known: {', '.join(strategy_names())})") from None


__all__ = ["DEFAULT_STRATEGY", "Contribution", "Strategy", "get_strategy", "register_strategy", "strategy_names", "unregister_strategy"]

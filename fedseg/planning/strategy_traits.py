"""What planning needs to know of the federation's strategy, handed to it as data: planning
never looks a strategy up (the strategies live above it, in fedseg.federation)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StrategyTraits:
    """A strategy's planning traits; the defaults are those of a strategy that trains one
    network of one configuration on sites holding the same channels (a neutral plan)."""

    # the strategy's name, recorded in plans.json
    name: str
    # every site trains a network planned from its own fingerprint ("<configuration>@<site>")
    plans_per_site: bool = False
    # False: sites may hold different subsets of channels, merged by name into the plan's list
    # (mix-modal; may depend on the strategy's final params)
    requires_same_channels: bool = True
    # whether its model trains region-based labels (sigmoid per region, fedseg.data.labels)
    supports_regions: bool = True
    # training values planned unless `--set training.KEY=...` says otherwise (e.g. a loss)
    training_defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)


__all__ = ["StrategyTraits"]

"""The MDM-MixMFL recipe: the mix-modal network (fedseg.training.mixmfl_network) of the
site's configuration, with the sequences the site holds, and its trainer."""

from __future__ import annotations

from fedseg.planning.plans import Plans
from fedseg.training.mixmfl_network import MixMFLNet, build_mixmfl_network
from fedseg.training.mixmfl_trainer import MixMFLTrainer
from fedseg.training.recipes.params import MixMFLParams, present_indices, sequence_keys
from fedseg.typed_params import parse_params


def build_network(plans: Plans, site: str) -> MixMFLNet:
    """One tailored encoder per sequence of the federation, those the site holds marked
    present; seeded with plans.seed (bit-identical initial weights at every site)."""
    params = parse_params(MixMFLParams, plans.strategy.params)
    return build_mixmfl_network(
        plans.configuration_for(site), sequence_keys(plans), plans.n_classes,
        present=present_indices(plans, site), memory_size=params.memory_size,
        use_memory=params.memory, memory_query=params.memory_query, seed=plans.seed,
    )


TRAINER = MixMFLTrainer

__all__ = ["TRAINER", "build_network"]

"""The FedFMS recipes: the prompt-free SAM segmenter (fedseg.training.sam) built from the
plan's `sam.*` parameters, with MSA adapters and a frozen image encoder or fully trained,
and its Adam trainer (fedseg.training.sam_trainer)."""

from __future__ import annotations

from fedseg.planning.plans import Plans
from fedseg.training.recipes.params import SamParams
from fedseg.training.sam import SamSegmenter, build_sam_segmenter, sam_config
from fedseg.training.sam_trainer import SamTrainer
from fedseg.typed_params import parse_params


def build_network(plans: Plans, site: str, *, adapters: bool) -> SamSegmenter:
    """SAM of `sam.config` at `sam.image_size`, from `sam.checkpoint` where given, else seeded
    with plans.seed. With `adapters`, MSA adapters are added and the image encoder is frozen
    (left out of the state: every site rebuilds it the same way)."""
    params = parse_params(SamParams, plans.strategy.params)
    return build_sam_segmenter(
        sam_config(params.config, params.image_size), plans.n_channels, plans.n_classes,
        adapters=adapters, freeze_backbone=adapters,
        checkpoint=params.checkpoint, checkpoint_sha256=params.checkpoint_sha256,
        seed=plans.seed, zero_adapters=params.adapter_init == "zero",
    )


def build_with_adapters(plans: Plans, site: str) -> SamSegmenter:
    """The fedmsa network: MSA adapters, frozen image encoder."""
    return build_network(plans, site, adapters=True)


def build_fully_trained(plans: Plans, site: str) -> SamSegmenter:
    """The fedsam network: every parameter trained."""
    return build_network(plans, site, adapters=False)


TRAINER = SamTrainer

__all__ = ["TRAINER", "build_fully_trained", "build_network", "build_with_adapters"]

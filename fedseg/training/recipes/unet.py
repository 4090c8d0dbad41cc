"""The plain U-Net recipe (nnU-Net's PlainConvUNet of the site's configuration) and its trainer."""

from __future__ import annotations

from fedseg.planning.plans import Plans
from fedseg.training.network import PlainConvUNet
from fedseg.training.network import build_network as build_plain_unet
from fedseg.training.trainer import SiteTrainer


def build_network(plans: Plans, site: str) -> PlainConvUNet:
    """The U-Net of the site's configuration, seeded with plans.seed: every site of a
    configuration builds bit-identical initial weights."""
    return build_plain_unet(plans.configuration_for(site), plans.n_channels, plans.n_classes, seed=plans.seed)


TRAINER = SiteTrainer

__all__ = ["TRAINER", "build_network"]

"""What each model recipe says about itself, as data, without torch: its parameters, whether
it trains region-based labels, the training values it plans by default, whether every site
must hold the plan's channels, and which tensors never leave a site.

Planning and the coordinator read these; the torch side (the network builder and the
trainer) is `fedseg.training.recipes.registry.get_recipe(name)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fedseg.errors import InputError
from fedseg.training.recipes.params import MixMFLParams, SamParams, is_frozen_backbone


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class RecipeTraits:
    """A model recipe's torch-free traits."""

    name: str
    # the typed parameters its builder and trainer read (fedseg.typed_params); None: none
    params: type | None = None
    # whether its model trains region-based labels (sigmoid per region, fedseg.data.labels)
    supports_regions: bool = True
    # training values `fedseg plan` sets unless `--set training.KEY=...` says otherwise
    training_defaults: Mapping[str, Any] = field(default_factory=_frozen, hash=False)
    # False: sites may hold subsets of the plan's channels (mix-modal; fedseg.data.channels)
    requires_same_channels: bool = True
    # the backbone is frozen and rebuilt at every site: its tensors never leave the site
    frozen_backbone: bool = False

    def stays_local(self, name: str) -> bool:
        """Whether tensor `name` of this recipe's network is never exchanged (a frozen backbone's)."""
        return self.frozen_backbone and is_frozen_backbone(name)


_RECIPES: dict[str, RecipeTraits] = {
    # nnU-Net's plain U-Net with the plan's loss
    "unet": RecipeTraits("unet"),
    # the plain U-Net trained with FLAMES' 0.3·Dice + 0.7·Focal loss (defined on softmax classes)
    "unet_dice_focal": RecipeTraits("unet_dice_focal", supports_regions=False,
                                    training_defaults=_frozen({"loss": "dice_focal"})),
    # MDM-MixMFL's mix-modal network: its decoder and losses are softmax over classes
    "mixmfl": RecipeTraits("mixmfl", params=MixMFLParams, supports_regions=False, requires_same_channels=False),
    # prompt-free SAM with MSA adapters, the image encoder frozen (fedmsa); the SAM mask
    # decoder's head is softmax over classes
    "sam_adapters": RecipeTraits("sam_adapters", params=SamParams, supports_regions=False, frozen_backbone=True),
    # prompt-free SAM, every parameter trained (fedsam)
    "sam_full": RecipeTraits("sam_full", params=SamParams, supports_regions=False),
}


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


def recipe_traits(name: str) -> RecipeTraits:
    """The traits of recipe `name`; InputError for an unknown name."""
    try:
        return _RECIPES[name]
    except KeyError:
        raise InputError(f"unknown model recipe {name!r} (known: {', '.join(recipe_names())})") from None


__all__ = ["RecipeTraits", "recipe_names", "recipe_traits"]

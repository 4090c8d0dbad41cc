"""The model recipes with their torch side: `get_recipe(name)` gives the network builder and
the trainer class of a recipe whose traits `fedseg.training.recipes.traits` describes.

Importing this module imports torch: the coordinator's aggregation reads only the traits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedseg.planning.plans import Plans
from fedseg.training.recipes import mixmfl, sam, unet
from fedseg.training.recipes.traits import RecipeTraits, recipe_names, recipe_traits
from fedseg.training.trainer import SiteTrainer


@dataclass(frozen=True)
class ModelRecipe:
    """A recipe's traits, network builder and trainer."""

    traits: RecipeTraits
    build: Callable[[Plans, str], Any]
    trainer: type[SiteTrainer]

    @property
    def name(self) -> str:
        return self.traits.name

    def network(self, plans: Plans, site: str) -> Any:
        """The torch module site `site` trains, with deterministic initial weights (plans.seed)."""
        return self.build(plans, site)

    def trainer_class(self, plans: Plans) -> type[SiteTrainer]:
        """The SiteTrainer subclass a site trains this recipe's network with."""
        return self.trainer


_TORCH_SIDE: dict[str, tuple[Callable[[Plans, str], Any], type[SiteTrainer]]] = {
    "unet": (unet.build_network, unet.TRAINER),
    "unet_dice_focal": (unet.build_network, unet.TRAINER),   # the loss comes from its training defaults
    "mixmfl": (mixmfl.build_network, mixmfl.TRAINER),
    "sam_adapters": (sam.build_with_adapters, sam.TRAINER),
    "sam_full": (sam.build_fully_trained, sam.TRAINER),
}
assert sorted(_TORCH_SIDE) == recipe_names(), "every recipe has traits and a torch side"


def get_recipe(name: str) -> ModelRecipe:
    """Recipe `name` (InputError for an unknown name, from its traits)."""
    traits = recipe_traits(name)
    build, trainer = _TORCH_SIDE[name]
    return ModelRecipe(traits=traits, build=build, trainer=trainer)


__all__ = ["ModelRecipe", "get_recipe"]

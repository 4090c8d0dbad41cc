"""Model recipes: what a site trains (the network builder, the trainer, the typed parameters
with their checks, the training defaults), apart from how the coordinator aggregates.

An aggregation rule (fedseg.federation.strategies) names its recipe; the recipe's traits
(`fedseg.training.recipes.traits`, with its parameters in `fedseg.training.recipes.params`)
import neither torch nor any other training module, so planning and `fedseg aggregate` read
them at no start-up cost. The torch side (`unet`, `mixmfl`, `sam`, looked up through
`fedseg.training.recipes.registry.get_recipe`) is imported only where a site trains or a
network is built.

This package imports nothing itself.
"""

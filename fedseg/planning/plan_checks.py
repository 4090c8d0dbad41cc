"""The checks every plan gets: made by `make_plans` or read from a plans.json."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedseg.errors import InputError
from fedseg.planning.budget import check_compute, estimate_feature_map_voxels
from fedseg.planning.settings import PLAN_SETTINGS

if TYPE_CHECKING:  # pragma: no cover - typing only; plans.py reads plans with these checks
    from fedseg.planning.plans import Plans


def check_plan_values(plans: Plans, source: str = "") -> None:
    """The plan keys' types and ranges (PLAN_SETTINGS) and the memory bound, applied to a whole
    plan: to every plan `make_plans` returns and every plans.json read (`load_plans`), since
    plan_id is a content hash anyone can recompute, not a seal on a hand-made file."""
    for name in vars(plans.training):
        PLAN_SETTINGS[f"training.{name}"].validate(getattr(plans.training, name), source)
    PLAN_SETTINGS["seed"].validate(plans.seed, source)
    for name, config in plans.configurations.items():
        patch = PLAN_SETTINGS["configuration.patch_size"].validate(config.patch_size, source)
        batch = PLAN_SETTINGS["configuration.batch_size"].validate(config.batch_size, source)
        network = config.network
        try:
            estimate = estimate_feature_map_voxels(patch, network.strides, network.features_per_stage, plans.n_classes)
            check_compute(patch, estimate, batch, len(patch), f"configuration {name!r}", source)
        except (ArithmeticError, TypeError, ValueError, IndexError):
            raise InputError(f"{source}configuration {name!r}: the network does not fit its patch size") from None



"""nnU-Net's experiment planning (plain conv U-Net), from a merged federated fingerprint.

The rules are nnU-Net v2's ExperimentPlanner, with the reason for each constant beside it:
target spacing = per-axis median spacing with the anisotropy rule; an initial patch with the
aspect ratio of 1/spacing, clipped to the median image shape; the pooling topology of
get_pool_and_conv_props; the patch shrunk one axis at a time until the estimated activation
memory fits the budget; batch size grown into any budget left, but never covering more than
5 % of the dataset; normalisation per channel name.

Where each part lives: fedseg.planning.topology (spacing, pooling, network, patch),
fedseg.planning.budget (activation estimate, batch size, memory bound),
fedseg.planning.configurations (one configuration, or one per site), fedseg.planning.overrides
(`--set`), fedseg.planning.plan_checks (the checks every plan gets). This module assembles
the plan.

Differences from nnU-Net, on purpose:
- The budget is a number (`budget`, in nnU-Net's "GPU memory target in GB": 8 reproduces
  nnU-Net's default plans) instead of a GPU query; fedseg's default is sized for training on
  a CPU. The memory estimate counts feature-map voxels exactly as nnU-Net's
  `compute_conv_feature_map_size` does, without instantiating a network (no torch here).
- The number of stages is capped (6 in 3D, 7 in 2D): deeper networks only pay off for
  patches far larger than a CPU budget allows.
- No axis transpose: arrays stay (z, y, x) and the 2d configuration always takes (y, x)
  slices; nnU-Net moves the largest-spacing axis first, which is the same for the common
  case of a thick-slice z axis.
- numTraining is the sum over all sites, so every site derives the same plan.

What the plan takes from the federation's strategy (per-site configurations, mix-modal
channels, region-based labels, training defaults) comes in as data, a StrategyTraits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedseg.data.labels import parse_labels
from fedseg.errors import InputError
from fedseg.planning.budget import (
    DEFAULT_BUDGET,
    MAX_OVERRIDE_BUDGET_GB,
    MIN_BATCH_SIZE,
    batch_size_for,
    check_compute,
    estimate_feature_map_voxels,
    memory_estimate_gb,
)
from fedseg.planning.configurations import (
    CONFIGURATIONS,
    SITE_CONFIGURATION_SEPARATOR,
    normalization_schemes,
    plan_configuration,
    site_configurations,
    with_batch_size,
    with_patch_size,
)
from fedseg.planning.merge import merge_fingerprints
from fedseg.planning.overrides import final_strategy_params, parse_value, split_overrides
from fedseg.planning.plan_checks import check_plan_values
from fedseg.planning.plans import ConfigurationPlan, Plans, SiteInfo, StrategySpec, TrainingSpec
from fedseg.planning.settings import PLAN_SETTINGS
from fedseg.planning.strategy_traits import StrategyTraits
from fedseg.planning.topology import (
    ANISOTROPY_THRESHOLD,
    features_per_stage,
    new_shape,
    plan_patch_and_network,
    pool_and_conv_props,
    target_spacing,
)


def check_supports_regions(traits: StrategyTraits, merged: Mapping[str, Any]) -> None:
    """Refuse region-based labels for a strategy whose model cannot train them."""
    if merged.get("regions_class_order") and not traits.supports_regions:
        raise InputError(
            f"strategy {traits.name!r} does not train region-based labels (lists in dataset.json's labels); "
            "choose a strategy whose model trains them"
        )


def training_defaults(traits: StrategyTraits) -> dict[str, Any]:
    """The strategy's training defaults, checked as `--set training.KEY=...` values are."""
    return {key: PLAN_SETTINGS[f"training.{key}"].validate(value) for key, value in traits.training_defaults.items()}


def planned_configuration_name(merged: Mapping[str, Any], configuration: str | None, notes: list[str]) -> str:
    """The configuration to plan: 2D images, or volumes that all have a single slice, always
    get "2d" (a 3D network on one slice is no 3D network; said in `notes`); None: "3d_fullres"."""
    if merged["image_dim"] == 2:
        return "2d"
    if all(int(shape[0]) == 1 for shape in merged["shapes_after_crop"]):
        # volumes of one slice (2D NIfTI, ...): as for PNG, a 3D network on one slice is no 3D network
        if configuration != "2d":
            notes.append("every case has a single slice: planned the 2d configuration")
        return "2d"
    return "3d_fullres" if configuration is None else configuration


def common_configuration(merged: Mapping[str, Any], name: str, budget: float, config_over: Mapping[str, Any],
                         n_classes: int) -> ConfigurationPlan:
    """The configuration every site trains, with the `--set configuration.*` sizes."""
    config = plan_configuration(merged, name, budget)
    if "patch_size" in config_over:
        config = with_patch_size(config, config_over["patch_size"], n_classes, merged["n_cases"], budget)
    if "batch_size" in config_over:
        config = with_batch_size(config, config_over["batch_size"], n_classes)
    return config


def plan_sites(merged: Mapping[str, Any], site_configs: Mapping[str, str]) -> dict[str, SiteInfo]:
    """The plan's sites: modality, channels, case count and (per-site plans) configuration."""
    return {
        name: SiteInfo(modality=info["modality"], channels=list(info["channel_names"].values()), n_cases=info["n_cases"],
                       configuration=site_configs.get(name))
        for name, info in merged["sites"].items()
    }


def checked_budget(budget: float | None) -> float:
    """The planning budget: DEFAULT_BUDGET when not given, else a finite positive number."""
    budget = DEFAULT_BUDGET if budget is None else float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise InputError(f"--budget must be a positive number, not {budget}")
    return budget


def plan_configurations(
    fingerprints: Sequence[dict[str, Any]],
    fingerprint_names: Sequence[str] | None,
    merged: Mapping[str, Any],
    name: str,
    budget: float,
    config_over: Mapping[str, Any],
    per_site: bool,
) -> tuple[dict[str, ConfigurationPlan], dict[str, str]]:
    """(configurations by name, site -> its own configuration's name): one common
    configuration, or with `per_site` one per site planned from its own fingerprint."""
    n_classes = parse_labels(merged["labels"], merged.get("regions_class_order")).n_outputs
    # planned (and its `--set` sizes checked) even when every site gets its own, as before
    config = common_configuration(merged, name, budget, config_over, n_classes)
    if not per_site:
        return {config.name: config}, {}
    configurations = site_configurations(fingerprints, fingerprint_names, name, budget, config_over, n_classes)
    return configurations, {c.split(SITE_CONFIGURATION_SEPARATOR, 1)[1]: c for c in configurations}


def make_plans(
    fingerprints: Sequence[dict[str, Any]],
    strategy: str,
    strategy_params: Mapping[str, Any] | None = None,
    configuration: str | None = "3d_fullres",
    budget: float | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 1234,
    fingerprint_names: Sequence[str] | None = None,
    require_same_channels: bool | None = None,
    per_site: bool | None = None,
    *,
    traits: StrategyTraits | None = None,
) -> Plans:
    """Merge the sites' fingerprints and plan the federation for strategy `strategy`, whose
    `traits` say what the plan takes from it (None: neutral traits of that name).

    `budget`: nnU-Net "GPU memory target" GB-equivalents (8 = nnU-Net's default plans;
    default DEFAULT_BUDGET, sized for a CPU). `configuration`: see `planned_configuration_name`.
    `overrides` are `--set` keys: training.<field>, configuration.patch_size / batch_size /
    per_site, seed, and strategy.<key> or any other key as a strategy parameter (string
    values parsed as JSON when they parse). The plan does not depend on the order of
    `fingerprints`. `require_same_channels` and `per_site` override the traits' if not None.
    """
    if not isinstance(strategy, str) or not strategy:
        raise InputError("strategy name must be a non-empty string")
    traits = StrategyTraits(name=strategy) if traits is None else traits
    if traits.name != strategy:
        raise ValueError(f"the traits are those of strategy {traits.name!r}, not {strategy!r}")
    budget = checked_budget(budget)
    training_over, config_over, strategy_over, seed_over = split_overrides(overrides or {})
    # `--set configuration.per_site=true`: e.g. local-only training on each site's own plan,
    # the baseline a hospital training nnU-Net alone would have.
    per_site = config_over.pop("per_site", per_site)
    same = traits.requires_same_channels if require_same_channels is None else require_same_channels
    merged = merge_fingerprints(fingerprints, fingerprint_names, require_same_channels=same)
    check_supports_regions(traits, merged)
    notes: list[str] = []
    name = planned_configuration_name(merged, configuration, notes)
    configurations, site_configs = plan_configurations(
        fingerprints, fingerprint_names, merged, name, budget, config_over,
        traits.plans_per_site if per_site is None else per_site)
    plans = Plans(
        dataset_name="+".join(sorted({fp.get("dataset_name") or fp["site"] for fp in fingerprints})),
        channel_names=dict(merged["channel_names"]),
        labels=dict(merged["labels"]),
        regions_class_order=list(merged["regions_class_order"]) if merged.get("regions_class_order") else None,
        file_ending=merged["file_ending"],
        fingerprint=merged,
        sites=plan_sites(merged, site_configs),
        strategy=StrategySpec(name=strategy, params={**dict(strategy_params or {}), **strategy_over}),
        configurations=configurations,
        default_configuration=min(configurations),
        training=TrainingSpec(**{**training_defaults(traits), **training_over}),
        seed=int(seed if seed_over is None else seed_over),
        extra={"planning": {"budget": budget, "planner": "nnU-Net ExperimentPlanner rules (fedseg)",
                            **({"notes": notes} if notes else {})}},
    )
    check_plan_values(plans)   # what every command reading this plan will check
    return plans


# Names this module held before planning was split by responsibility; importers may use either path.
__all__ = [
    "ANISOTROPY_THRESHOLD", "CONFIGURATIONS", "DEFAULT_BUDGET", "MAX_OVERRIDE_BUDGET_GB", "MIN_BATCH_SIZE",
    "SITE_CONFIGURATION_SEPARATOR", "StrategyTraits", "batch_size_for", "check_compute", "check_plan_values",
    "check_supports_regions", "checked_budget", "estimate_feature_map_voxels", "features_per_stage", "final_strategy_params",
    "make_plans", "memory_estimate_gb", "new_shape", "normalization_schemes", "parse_value", "plan_configuration",
    "plan_configurations", "plan_patch_and_network", "pool_and_conv_props", "site_configurations", "split_overrides", "target_spacing",
    "training_defaults", "with_batch_size", "with_patch_size",
]

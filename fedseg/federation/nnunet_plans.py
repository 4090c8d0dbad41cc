"""nnU-Net v2's plans.json, dataset.json and dataset_fingerprint.json <-> fedseg's plan.

fedseg's `ConfigurationPlan` holds the same numbers as one entry of nnU-Net's
`configurations` (spacing, patch size, batch size, normalisation, the PlainConvUNet's
arch_kwargs); fedseg's merged fingerprint already uses nnU-Net's key names. The network
fedseg builds is nnU-Net's default: Conv with bias, InstanceNorm(eps 1e-5, affine),
LeakyReLU(0.01), no dropout. A plan that asks for anything else is refused rather than
approximated, since the weights would then mean something else.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.errors import InputError
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans

PLAINCONVUNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
PLANS_NAME = "nnUNetPlans"
DEFAULT_TRAINER = "nnUNetTrainer"
# fedseg's normalisation schemes carry nnU-Net's class names (fedseg/data/normalization.py).
SUPPORTED_NORMALIZATION = ("CTNormalization", "ZScoreNormalization", "RescaleTo01Normalization", "NoNormalization")
_RESAMPLING_FN = "resample_data_or_seg_to_shape"
# The interpolation orders fedseg's resampling uses (fedseg/data/resampling.py), which are
# nnU-Net's defaults: images 3, segmentations 1 (one-hot), probabilities 1, 0 across thick slices.
_RESAMPLING_KWARGS = {
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}
_NONLIN = "torch.nn.LeakyReLU"
_DEFAULT_LEAKY_SLOPE = 1e-2
_NORM_EPS = 1e-5


def base_configuration_name(name: str) -> str:
    """'3d_fullres@site_a' (a per-site configuration) -> '3d_fullres': what nnU-Net calls it."""
    return name.split("@", 1)[0]


def reader_writer_for(file_ending: str) -> str:
    """nnU-Net's image reader class for a file ending (what its predictor reads and writes with)."""
    ending = file_ending.lower()
    if ending in (".png", ".bmp", ".jpg", ".jpeg"):
        return "NaturalImage2DIO"
    if ending in (".tif", ".tiff"):
        return "Tiff3DIO"
    return "SimpleITKIO"


def _arch_kwargs(network: NetworkSpec, ndim: int) -> dict[str, Any]:
    return {
        "n_stages": network.n_stages,
        "features_per_stage": list(network.features_per_stage),
        "conv_op": f"torch.nn.modules.conv.Conv{ndim}d",
        "kernel_sizes": [list(k) for k in network.kernel_sizes],
        "strides": [list(s) for s in network.strides],
        "n_conv_per_stage": list(network.n_conv_per_stage),
        "n_conv_per_stage_decoder": list(network.n_conv_per_stage_decoder),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d",
        "norm_op_kwargs": {"eps": _NORM_EPS, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": _NONLIN,
        "nonlin_kwargs": {"inplace": True},
    }


def nnunet_configuration(config: ConfigurationPlan, plans_name: str = PLANS_NAME) -> dict[str, Any]:
    """One entry of nnU-Net's `configurations` for a fedseg configuration."""
    name = base_configuration_name(config.name)
    return {
        "data_identifier": f"{plans_name}_{name}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(config.batch_size),
        "patch_size": [int(p) for p in config.patch_size],
        "median_image_size_in_voxels": [float(s) for s in config.median_image_size_in_voxels],
        "spacing": [float(s) for s in config.spacing],
        "normalization_schemes": list(config.normalization_schemes),
        "use_mask_for_norm": [bool(u) for u in config.use_mask_for_norm],
        "resampling_fn_data": _RESAMPLING_FN,
        "resampling_fn_seg": _RESAMPLING_FN,
        "resampling_fn_data_kwargs": dict(_RESAMPLING_KWARGS["resampling_fn_data_kwargs"]),
        "resampling_fn_seg_kwargs": dict(_RESAMPLING_KWARGS["resampling_fn_seg_kwargs"]),
        "resampling_fn_probabilities": _RESAMPLING_FN,
        "resampling_fn_probabilities_kwargs": dict(_RESAMPLING_KWARGS["resampling_fn_probabilities_kwargs"]),
        "architecture": {
            "network_class_name": PLAINCONVUNET,
            "arch_kwargs": _arch_kwargs(config.network, config.ndim),
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        # Only nnU-Net's training loss reads it; prediction does not.
        "batch_dice": False,
    }


def _median(values: list[list[float]]) -> list[float]:
    return [float(v) for v in np.median(np.asarray(values, dtype=np.float64), axis=0)] if values else []


def nnunet_plans(plans: Plans, config: ConfigurationPlan, dataset_name: str) -> dict[str, Any]:
    """nnU-Net's plans.json for one fedseg configuration (axes are never transposed: fedseg has no transposition)."""
    fingerprint = plans.fingerprint
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": _median(fingerprint.get("spacings", [])),
        "original_median_shape_after_transp": [int(round(s)) for s in _median(fingerprint.get("shapes_after_crop", []))],
        "image_reader_writer": reader_writer_for(plans.file_ending),
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {base_configuration_name(config.name): nnunet_configuration(config)},
        "experiment_planner_used": "fedseg",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": copy.deepcopy(
            fingerprint.get("foreground_intensity_properties_per_channel", {})
        ),
    }


def nnunet_dataset_json(plans: Plans, dataset_name: str) -> dict[str, Any]:
    return {
        "name": dataset_name.split("_", 1)[-1],
        "description": f"fedseg federation ({plans.strategy.name}, sites {', '.join(sorted(plans.sites))}), plan {plans.plan_id[:12]}",
        "channel_names": dict(plans.channel_names),
        "labels": dict(plans.labels),
        "numTraining": int(sum(s.n_cases for s in plans.sites.values())),
        "file_ending": plans.file_ending,
    }


def nnunet_fingerprint(plans: Plans) -> dict[str, Any]:
    """dataset_fingerprint.json: the merged fingerprint's nnU-Net keys (pooled over the sites)."""
    fp = plans.fingerprint
    return {
        "foreground_intensity_properties_per_channel": copy.deepcopy(fp.get("foreground_intensity_properties_per_channel", {})),
        "median_relative_size_after_cropping": float(fp.get("median_relative_size_after_cropping", 1.0)),
        "shapes_after_crop": [list(s) for s in fp.get("shapes_after_crop", [])],
        "spacings": [list(s) for s in fp.get("spacings", [])],
    }


# ---------------------------------------------------------------------------------------
# nnU-Net -> fedseg
# ---------------------------------------------------------------------------------------
def resolved_configuration(nnunet_plans_dict: Mapping[str, Any], name: str, source: Path) -> dict[str, Any]:
    """A configuration with `inherits_from` resolved, as nnU-Net's PlansManager does."""
    configurations = nnunet_plans_dict.get("configurations")
    if not isinstance(configurations, Mapping) or name not in configurations:
        known = ", ".join(sorted(configurations)) if isinstance(configurations, Mapping) else "none"
        raise InputError(f"has no configuration {name!r} (configurations: {known})", source)
    entry = dict(configurations[name])
    parent = entry.pop("inherits_from", None)
    if parent is not None:
        if parent == name:
            raise InputError(f"configuration {name!r} inherits from itself", source)
        entry = {**resolved_configuration(nnunet_plans_dict, parent, source), **entry}
    return entry


def _require(condition: bool, message: str, source: Path) -> None:
    if not condition:
        raise InputError(message, source)


def configuration_from_nnunet(nnunet_plans_dict: Mapping[str, Any], name: str, source: Path) -> ConfigurationPlan:
    """fedseg's ConfigurationPlan for nnU-Net configuration `name`; refuses what fedseg cannot build."""
    entry = resolved_configuration(nnunet_plans_dict, name, source)
    _require(not entry.get("previous_stage"), f"configuration {name!r} is a cascade stage; fedseg has no cascade", source)
    transpose = list(nnunet_plans_dict.get("transpose_forward", [0, 1, 2]))
    _require(transpose == [0, 1, 2], f"transpose_forward is {transpose}; fedseg does not transpose axes", source)
    arch = entry.get("architecture") or {}
    cls = arch.get("network_class_name", "")
    _require(cls == PLAINCONVUNET, f"configuration {name!r} uses network {cls!r}; fedseg builds only {PLAINCONVUNET}", source)
    kw = arch.get("arch_kwargs") or {}
    patch = [int(p) for p in entry["patch_size"]]
    ndim = len(patch)
    _require(kw.get("conv_op") == f"torch.nn.modules.conv.Conv{ndim}d", f"conv_op {kw.get('conv_op')!r} does not fit a {ndim}D patch", source)
    _require(kw.get("conv_bias") is True, "conv_bias is not true; fedseg's convolutions carry a bias", source)
    _require(
        kw.get("norm_op") == f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d",
        f"norm_op {kw.get('norm_op')!r}: fedseg uses InstanceNorm{ndim}d", source,
    )
    norm_kwargs = kw.get("norm_op_kwargs") or {}
    _require(
        norm_kwargs.get("affine") is True and float(norm_kwargs.get("eps", _NORM_EPS)) == _NORM_EPS,
        f"norm_op_kwargs {norm_kwargs}: fedseg uses eps=1e-05, affine=True", source,
    )
    _require(kw.get("dropout_op") is None, f"dropout_op {kw.get('dropout_op')!r}: fedseg's U-Net has no dropout", source)
    slope = float((kw.get("nonlin_kwargs") or {}).get("negative_slope", _DEFAULT_LEAKY_SLOPE))
    _require(
        kw.get("nonlin") in (_NONLIN, "torch.nn.modules.activation.LeakyReLU") and slope == _DEFAULT_LEAKY_SLOPE,
        f"nonlin {kw.get('nonlin')!r} {kw.get('nonlin_kwargs')}: fedseg uses LeakyReLU(0.01)", source,
    )
    schemes = list(entry["normalization_schemes"])
    unsupported = [s for s in schemes if s not in SUPPORTED_NORMALIZATION]
    _require(not unsupported, f"normalization {unsupported[0] if unsupported else ''!r} is not one fedseg has ({', '.join(SUPPORTED_NORMALIZATION)})", source)
    network = NetworkSpec(
        n_stages=int(kw["n_stages"]),
        features_per_stage=[int(f) for f in kw["features_per_stage"]],
        kernel_sizes=[[int(k) for k in ks] for ks in kw["kernel_sizes"]],
        strides=[[int(s) for s in ss] for ss in kw["strides"]],
        n_conv_per_stage=[int(n) for n in kw["n_conv_per_stage"]],
        n_conv_per_stage_decoder=[int(n) for n in kw["n_conv_per_stage_decoder"]],
        deep_supervision=True,
    )
    return ConfigurationPlan(
        name=name,
        spacing=[float(s) for s in entry["spacing"]],
        patch_size=patch,
        median_image_size_in_voxels=[float(s) for s in entry.get("median_image_size_in_voxels", patch)],
        batch_size=int(entry["batch_size"]),
        normalization_schemes=schemes,
        use_mask_for_norm=[bool(u) for u in entry["use_mask_for_norm"]],
        network=network,
    )

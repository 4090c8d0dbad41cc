"""Start a federation from an nnU-Net v2 trained model (fine-tuning a pretrained model across sites).

Two steps, as the CLI has them:
- `adopt_nnunet_plan`: the federation's plan takes the nnU-Net configuration (spacing,
  patch, normalisation, network) instead of planning its own, so the pretrained weights fit.
- `nnunet_initial_state`: the checkpoint's weights (read with torch.load(weights_only=True)),
  checked parameter by parameter against the plan's network; they replace the random
  round-0 weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.nnunet_checkpoint import CHECKPOINT_NAME, NnunetCheckpoint, read_checkpoint
from fedseg.federation.nnunet_names import nnunet_names
from fedseg.federation.nnunet_plans import configuration_from_nnunet
from fedseg.planning.plans import Plans

# Where the adopted plan records its origin (plans.extra[NNUNET_KEY]).
NNUNET_KEY = "nnunet"
# The federation's own merged intensity statistics are kept under this key when the nnU-Net
# plan's statistics (which the pretrained network was normalised with) take their place.
FEDERATED_INTENSITY_KEY = "foreground_intensity_properties_per_channel_federated"


@dataclass
class TrainerFolder:
    path: Path
    trainer: str
    plans_name: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("not found (an nnU-Net trained-model folder holds plans.json and dataset.json)", path)
    try:
        body = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", path) from None
    if not isinstance(body, dict):
        raise InputError("is not a JSON object", path)
    return body


def open_trainer_folder(path: str | Path) -> TrainerFolder:
    """An nnU-Net trained-model folder, `<Trainer>__<Plans>__<configuration>`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError("nnU-Net trained-model folder not found", path)
    parts = path.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise InputError("is not named <Trainer>__<Plans>__<configuration>, as nnU-Net names its trained-model folders", path)
    return TrainerFolder(
        path=path, trainer=parts[0], plans_name=parts[1], configuration=parts[2],
        plans=_read_json(path / "plans.json"), dataset_json=_read_json(path / "dataset.json"),
    )


def adopt_nnunet_plan(plans: Plans, folder: TrainerFolder) -> Plans:
    """`plans` (made from the sites' fingerprints) with the nnU-Net model's configuration.

    The sites must hold what the nnU-Net model was trained for: the same labels and the same
    number of channels. Every site uses the one adopted configuration.
    """
    source = folder.path / "plans.json"
    config = configuration_from_nnunet(folder.plans, folder.configuration, source)
    labels = folder.dataset_json.get("labels")
    if labels != plans.labels:
        raise InputError(f"labels {labels} differ from the sites' labels {plans.labels}", folder.path / "dataset.json")
    channels = folder.dataset_json.get("channel_names") or {}
    if len(channels) != plans.n_channels:
        raise InputError(
            f"has {len(channels)} channel(s), the sites have {plans.n_channels}", folder.path / "dataset.json"
        )
    if config.ndim == 3 and plans.default_configuration == "2d":
        raise InputError(f"configuration {folder.configuration!r} is 3D but the sites' images are 2D", source)
    fingerprint = copy.deepcopy(plans.fingerprint)
    nnunet_intensity = folder.plans.get("foreground_intensity_properties_per_channel")
    if nnunet_intensity:
        fingerprint[FEDERATED_INTENSITY_KEY] = fingerprint.get("foreground_intensity_properties_per_channel")
        fingerprint["foreground_intensity_properties_per_channel"] = copy.deepcopy(nnunet_intensity)
    extra = copy.deepcopy(plans.extra)
    extra.pop("manifests", None)  # the network changed: `attach_manifests` records it anew
    extra[NNUNET_KEY] = {
        "trainer_folder": folder.path.name,
        "dataset_name": folder.plans.get("dataset_name"),
        "trainer": folder.trainer,
        "plans_name": folder.plans_name,
        "configuration": folder.configuration,
    }
    return dataclasses.replace(
        plans,
        configurations={config.name: config},
        default_configuration=config.name,
        sites={name: dataclasses.replace(info, configuration=None) for name, info in plans.sites.items()},
        fingerprint=fingerprint,
        extra=extra,
    )


def checkpoint_path(folder: TrainerFolder, fold: str) -> Path:
    if fold != "all" and not fold.isdigit():
        raise InputError(f"--fold must be a fold number or 'all', not {fold!r}")
    return folder.path / f"fold_{fold}" / CHECKPOINT_NAME


def check_architecture(expected: dict[str, tuple[int, ...]], checkpoint: NnunetCheckpoint, source: Path) -> None:
    """InputError naming the first parameter (in the plan's network order) that does not match."""
    for name, shape in expected.items():
        got = checkpoint.weights.get(name)
        nn_name = nnunet_names(name)[0]
        if got is None:
            raise InputError(f"lacks parameter {nn_name!r} {list(shape)} of the plan's network (architectures differ)", source)
        if tuple(got.shape) != tuple(shape):
            raise InputError(
                f"parameter {nn_name!r} is {list(got.shape)}, the plan's network has {list(shape)} (architectures differ)",
                source,
            )
    extra = [n for n in checkpoint.weights if n not in expected]
    if extra:
        raise InputError(f"has parameter {nnunet_names(extra[0])[0]!r}, which the plan's network lacks (architectures differ)", source)


def nnunet_initial_state(plans: Plans, folder: TrainerFolder, fold: str = "all") -> dict[str, np.ndarray]:
    """The nnU-Net checkpoint's weights under fedseg's names, checked against the plan's network."""
    path = checkpoint_path(folder, fold)
    checkpoint = read_checkpoint(path)
    site = sorted(plans.sites)[0]
    expected = {name: shape for name, (shape, _dtype) in expected_parameters(plans, site).items()}
    check_architecture(expected, checkpoint, path)
    return {name: checkpoint.weights[name] for name in expected}

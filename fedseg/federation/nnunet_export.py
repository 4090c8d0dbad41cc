"""Export a federation's U-Net as an nnU-Net v2 trained-model folder.

Writes nnU-Net's results layout, which `nnUNetv2_predict` reads unchanged:

    RESULTS/DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__<configuration>/
        plans.json  dataset.json  dataset_fingerprint.json
        fold_all/checkpoint_final.pth

The model is the one a site would predict with: the weight file, completed by the site's
local tensors (`--state`) for strategies that keep parameters at the site (asymfedavg).
Strategies whose network is not nnU-Net's U-Net (mixmfl, fedmsa, fedsam) have nothing
nnU-Net could run, and are refused.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedseg.errors import InputError
from fedseg.federation.nnunet_checkpoint import CHECKPOINT_NAME, write_checkpoint
from fedseg.federation.nnunet_plans import (
    DEFAULT_TRAINER,
    PLANS_NAME,
    base_configuration_name,
    nnunet_dataset_json,
    nnunet_fingerprint,
    nnunet_plans,
)
from fedseg.federation.routes import route_table
from fedseg.training.site_state import load_local_state
from fedseg.federation.site_update import compose_site_state
from fedseg.federation.strategies import get_strategy
from fedseg.federation.weightfile import open_weight_file, to_numpy
from fedseg.planning.plans import ConfigurationPlan, Plans
from fedseg.training.network import PlainConvUNet
from fedseg.training.recipes.registry import get_recipe

DEFAULT_DATASET = "Dataset999_fedseg"
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9][A-Za-z0-9_.-]*$")
FOLD = "all"


@dataclass
class ExportResult:
    trainer_folder: Path
    dataset_id: int
    configuration: str
    site: str | None
    predict_command: str


def parse_dataset_name(name: str) -> int:
    """The NNN of 'DatasetNNN_Name' (nnU-Net's naming rule), or an InputError."""
    m = _DATASET_NAME.match(name)
    if not m:
        raise InputError(f"--dataset must look like Dataset999_Name (three digits, then a name), not {name!r}")
    return int(m.group(1))


def require_unet(plans: Plans, site: str) -> None:
    """InputError unless `site` trains nnU-Net's plain U-Net under this plan's strategy."""
    network = get_recipe(get_strategy(plans.strategy.name).recipe).network(plans, site)
    if not isinstance(network, PlainConvUNet):
        raise InputError(
            f"strategy {plans.strategy.name!r} trains a {type(network).__name__}, not nnU-Net's U-Net: "
            "nnU-Net cannot run it, so there is nothing to export"
        )


def _site_for(plans: Plans, weights_site: str, site: str | None, weights: Path) -> str:
    if site is not None:
        plans.site(site)  # InputError for an unknown site
        return site
    if weights_site in plans.sites:
        return weights_site
    # A pool model (global, or one per modality group): the first site that loads its
    # tensors from that pool has the network the pool model belongs to.
    info = route_table(plans).pools.get(weights_site)
    if info is not None and info.members:
        return info.members[0]
    raise InputError(f"is the model of pool {weights_site!r}, which no site of the plan loads from; give --site", weights)


def model_state(plans: Plans, weights: Path, site: str | None, state_dir: Path | None) -> tuple[str, dict[str, np.ndarray]]:
    """(site, full parameter state) the exported network holds."""
    with open_weight_file(weights) as reader:
        weights_site = reader.meta.site
    site = _site_for(plans, weights_site, site, weights)
    require_unet(plans, site)
    local = {k: to_numpy(v) for k, v in load_local_state(state_dir).items()} if state_dir is not None else None
    try:
        state = compose_site_state(plans, site, weights, local)
    except InputError as exc:
        if state_dir is None and "no local copy" in exc.detail:
            raise InputError(f"{exc.detail}; give --site and --state (the site's state folder)", weights) from None
        raise
    return site, state


def export_nnunet(
    plans: Plans,
    weights: str | Path,
    out_dir: str | Path,
    *,
    dataset: str = DEFAULT_DATASET,
    site: str | None = None,
    state_dir: str | Path | None = None,
) -> ExportResult:
    """Write the trained-model folder; an existing one is replaced only by a complete new one."""
    dataset_id = parse_dataset_name(dataset)
    site, state = model_state(plans, Path(weights), site, Path(state_dir) if state_dir is not None else None)
    config: ConfigurationPlan = plans.configuration_for(site)
    configuration = base_configuration_name(config.name)
    nn_plans = nnunet_plans(plans, config, dataset)
    dataset_json = nnunet_dataset_json(plans, dataset)
    trainer_folder = Path(out_dir) / dataset / f"{DEFAULT_TRAINER}__{PLANS_NAME}__{configuration}"
    trainer_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{trainer_folder.name}.", dir=trainer_folder.parent))
    try:
        for name, body in (
            ("plans.json", nn_plans),
            ("dataset.json", dataset_json),
            ("dataset_fingerprint.json", nnunet_fingerprint(plans)),
        ):
            (staging / name).write_text(json.dumps(body, indent=4) + "\n")
        (staging / f"fold_{FOLD}").mkdir()
        write_checkpoint(
            staging / f"fold_{FOLD}" / CHECKPOINT_NAME,
            state,
            init_args={
                "plans": nn_plans, "configuration": configuration, "fold": FOLD,
                "dataset_json": dataset_json, "device": _cpu_device(),
            },
            trainer_name=DEFAULT_TRAINER,
            # fedseg trains with mirroring on every spatial axis (fedseg/training/dataloading.py),
            # so nnU-Net may mirror on all of them at test time, as it does for its own models.
            mirror_axes=tuple(range(config.ndim)),
        )
        _replace_folder(staging, trainer_folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    command = (
        f"nnUNet_results={shlex.quote(str(Path(out_dir).resolve()))} nnUNetv2_predict -i IMAGES -o OUTPUT -d {dataset_id:03d} "
        f"-c {configuration} -f {FOLD}"
    )
    return ExportResult(trainer_folder, dataset_id, configuration, site, command)


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _replace_folder(new: Path, target: Path) -> None:
    """Put `new` at `target`; an old `target` is moved aside first and removed only afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old)

"""nnU-Net interoperability: `fedseg export nnunet`, and the `--from-nnunet` steps of plan and init."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedseg.cli.options import JSON, QUIET, require_dir, require_file

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from fedseg.planning.plans import Plans

FROM_NNUNET_HELP = "An nnU-Net v2 trained-model folder (…/DatasetNNN_Name/<Trainer>__<Plans>__<configuration>)."

export_app = typer.Typer(
    help="Export a federation's model for another tool.\n\nExample: fedseg export nnunet --plans run/plans.json "
    "--weights run/round_003/models/global.safetensors -o nnunet_results",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@export_app.command("nnunet")
def export_nnunet(
    plans_path: Path = typer.Option(..., "--plans", help="plans.json of the federation."),
    weights: Path = typer.Option(..., "--weights", help="Model file: round_r/<site>.safetensors or round_r/models/<pool>.safetensors."),
    output: Path = typer.Option(..., "-o", "--output", help="nnU-Net results folder to write into (what nnUNet_results points at)."),
    dataset: str = typer.Option("Dataset999_fedseg", "--dataset", help="nnU-Net dataset name, DatasetNNN_Name."),
    site: str = typer.Option(None, "--site", help="Export this site's network (asymfedavg, flames: each site's own)."),
    state: Path = typer.Option(None, "--state", help="The site's state folder: its local tensors (asymfedavg)."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Write the model as an nnU-Net v2 trained-model folder that nnUNetv2_predict runs unchanged.

    Writes OUTPUT/DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__<configuration>/ with plans.json,
    dataset.json, dataset_fingerprint.json and fold_all/checkpoint_final.pth, and prints the
    nnUNetv2_predict command. mixmfl, fedmsa and fedsam train other networks: exit 2.

    Example: fedseg export nnunet --plans run/plans.json --weights run/round_003/models/global.safetensors
    --dataset Dataset501_Tiny -o nnunet_results
    """
    from fedseg.cli.console import Reporter, print_json
    from fedseg.federation.nnunet_export import export_nnunet as export
    from fedseg.planning.plans import load_plans

    plans = load_plans(require_file(plans_path, "plans file"))
    result = export(
        plans, require_file(weights, "weight file"), output, dataset=dataset, site=site,
        state_dir=require_dir(state, "state folder") if state is not None else None,
    )
    reporter = Reporter(quiet=quiet)
    reporter.log(f"wrote {result.trainer_folder}" + (f" (site {result.site})" if site else ""))
    reporter.log(f"predict with nnU-Net: {result.predict_command}")
    if as_json:
        print_json({
            "trainer_folder": str(result.trainer_folder), "dataset_id": result.dataset_id,
            "configuration": result.configuration, "site": result.site, "predict_command": result.predict_command,
        })


def adopt_nnunet_plan(plans: Plans, trainer_folder: Path) -> Plans:
    """`fedseg plan --from-nnunet`: the plan takes the nnU-Net model's configuration."""
    from fedseg.federation.nnunet_export import require_unet
    from fedseg.federation.nnunet_import import adopt_nnunet_plan as adopt
    from fedseg.federation.nnunet_import import open_trainer_folder

    adopted = adopt(plans, open_trainer_folder(trainer_folder))
    require_unet(adopted, sorted(adopted.sites)[0])
    return adopted


def nnunet_start_state(plans: Plans, trainer_folder: Path, fold: str) -> dict[str, np.ndarray]:
    """`fedseg init --from-nnunet`: the checkpoint's weights, checked against the plan's network."""
    from fedseg.federation.nnunet_import import nnunet_initial_state, open_trainer_folder

    return nnunet_initial_state(plans, open_trainer_folder(trainer_folder), fold)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")

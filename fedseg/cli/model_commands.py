"""Site-side model commands: train (one round), predict, evaluate."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.options import CHECKPOINT, DEVICE, JSON, MAX_VOXELS, PRECISION, QUIET, require_dir, require_file, require_output_dir, require_output_file
from fedseg.planning.settings import MAX_ITERATIONS_PER_ROUND, MAX_ROUNDS


def train(
    site: str = typer.Option(..., "--site", help="This site's name in the plan."),
    data: Path = typer.Option(..., "--data", help="The site's nnU-Net raw dataset folder."),
    plans_path: Path = typer.Option(..., "--plans", help="plans.json from the coordinator."),
    weights: Path = typer.Option(..., "--weights", help="Model to start from: round_<r-1>/<site>.safetensors."),
    state: Path = typer.Option(..., "--state", help="This site's private state folder (cache, optimizer, local parameters)."),
    output: Path = typer.Option(..., "-o", "--output", help="Update file to write: round_<r>/updates/<site>.safetensors."),
    iterations: int = typer.Option(None, "--iterations", min=1, max=MAX_ITERATIONS_PER_ROUND, help="Iterations this round (default: from the plan)."),
    epochs: int = typer.Option(None, "--epochs", min=1, max=MAX_ROUNDS, help="Epochs of the plan's iterations per round (iterations = epochs x plan's iterations_per_round)."),
    device: str = DEVICE,
    precision: str = PRECISION,
    workers: int = typer.Option(2, "--workers", min=0, help="Background augmentation workers (0: in-process)."),
    key: Path = typer.Option(None, "--key", help="This site's private key (fedseg keygen); required when the plan lists keys."),
    max_voxels: int = MAX_VOXELS,
    fold: str = typer.Option("0", "--fold", help="Cross-validation fold of STATE/splits_final.json: 0..n_folds-1, or 'all' (every case). Use one state folder per fold."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Train one round locally and write the update (only what may leave the site).

    With --key the update is signed (UPDATE.sig beside it); when the plan lists keys, the
    incoming model must carry the coordinator's signature. When the plan uses secure
    aggregation, --key is required too: its key-agreement key masks the update.

    A killed run started again with the same arguments resumes from its last checkpoint.

    Example: fedseg train --site site_a --data sites/site_a --plans plans.json
    --weights run/round_000/site_a.safetensors --state state/site_a -o run/round_001/updates/site_a.safetensors
    """
    from dataclasses import asdict

    from fedseg.cli.console import Reporter, print_json
    from fedseg.federation.site_training import run_site_round
    from fedseg.planning.plans import load_plans
    from fedseg.training.device import check_precision, resolve_device
    from fedseg.training.folds import parse_fold

    # every output checked before any work: a wrong -o or --state must not cost a round of training
    require_output_file(output, "update file")
    require_output_dir(state, "state folder")
    device = resolve_device(device)
    check_precision(precision)
    reporter = Reporter(quiet=quiet)
    plans = load_plans(require_file(plans_path, "plans file"))
    signing_key, agreement_key = _site_keys(key, plans)
    iterations = _round_iterations(iterations, epochs, plans)
    total = iterations or plans.training.iterations_per_round
    with reporter.progress(f"train {site}", total) as advance:
        result = run_site_round(
            plans, site, require_dir(data, "dataset folder"), require_file(weights, "weights file"), state, output,
            iterations=iterations, device=device, num_workers=workers, progress=advance, log=reporter.log,
            signing_key=signing_key, agreement_key=agreement_key, max_voxels=max_voxels,
            fold=parse_fold(fold, plans.training.n_folds), precision=precision,
        )
    reporter.log(
        f"round {result.round} {site}: {result.n_iterations} iterations, val Dice {result.val_dice:.3f}, "
        f"wrote {output} ({result.n_shared_tensors} shared tensors, {result.n_local_tensors} kept local)"
    )
    if as_json:
        print_json(asdict(result))


def _site_keys(key: Path | None, plans):
    """(signing key, key-agreement key) from --key: the agreement key only when the plan uses
    secure aggregation; (None, None) without --key."""
    from fedseg.federation.privacy import wants_secure_aggregation
    from fedseg.federation.secure_aggregation import load_agreement_key
    from fedseg.federation.signing import load_signing_key

    if key is None:
        return None, None
    signing_key = load_signing_key(require_file(key, "private key"))
    agreement_key = load_agreement_key(key) if wants_secure_aggregation(None, plans.strategy.params) else None
    return signing_key, agreement_key


def _round_iterations(iterations: int | None, epochs: int | None, plans) -> int | None:
    """--iterations, or --epochs times the plan's iterations per round (None: the plan's)."""
    from fedseg.errors import InputError

    if iterations is not None and epochs is not None:
        raise InputError("give --iterations or --epochs, not both")
    if epochs is not None:
        iterations = epochs * plans.training.iterations_per_round
        if iterations > MAX_ITERATIONS_PER_ROUND:
            raise InputError(f"--epochs {epochs} makes {iterations} iterations, more than {MAX_ITERATIONS_PER_ROUND}")
    return iterations


def predict(
    images: Path = typer.Option(..., "-i", "--input", help="Folder of {CASE}_{XXXX}<ending> channel files."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for {CASE}<ending> label maps."),
    plans_path: Path = typer.Option(None, "--plans", help="plans.json of the federation (with --weights)."),
    weights: list[Path] = typer.Option(None, "--weights", help="Model file(s) (round_r/<site>.safetensors or models/<pool>.safetensors); several: an ensemble."),
    run: list[Path] = typer.Option(None, "--run", help="Run folder(s) (plans.json + rounds), e.g. one per fold; several: an ensemble."),
    checkpoint: str = CHECKPOINT,
    inference_plan: Path = typer.Option(None, "--inference-plan", help="inference_plan.json from fedseg find-best: its models and post-processing."),
    site: str = typer.Option(None, "--site", help="Site whose network (and local parameters) to use."),
    state: Path = typer.Option(None, "--state", help="The site's state folder, for parameters that never left it."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write {CASE}.npz with the softmax 'probabilities' (as nnU-Net)."),
    mirror: bool = typer.Option(False, "--mirror/--no-mirror", help="Average predictions over mirrored inputs."),
    device: str = DEVICE,
    precision: str = PRECISION,
    max_voxels: int = MAX_VOXELS,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Segment a folder of images (sliding window, back to each image's own geometry).

    Several models (weight files, run folders, an inference plan) are ensembled by averaging
    their softmax probabilities.

    Example: fedseg predict --plans plans.json --weights run/round_003/site_a.safetensors
    -i sites/site_a/imagesTs -o pred/site_a --site site_a --state state/site_a

    Five folds at their best round: fedseg predict --run runs/3d/fold_0 ... --run runs/3d/fold_4
    --checkpoint best -i images -o pred

    As find-best chose: fedseg predict --inference-plan selection/inference_plan.json -i images -o pred
    (on a CPU with AMX, --precision bf16 is faster; labels may differ at a few boundary voxels)
    """
    from fedseg.cli.console import Reporter
    from fedseg.federation.ensemble_loading import ModelSource, load_members
    from fedseg.training.device import check_precision, resolve_device
    from fedseg.training.inference import predict_folder_ensemble

    require_output_dir(output, "output folder")
    if state is not None:
        require_output_dir(state, "state folder")   # may be absent when the site keeps nothing local
    device, precision = resolve_device(device), check_precision(precision)
    reporter = Reporter(quiet=quiet)
    source = ModelSource(
        weights=[require_file(w, "weights file") for w in weights or []],
        plans_path=require_file(plans_path, "plans file") if plans_path is not None else None,
        runs=[require_dir(r, "run folder") for r in run or []], checkpoint=checkpoint,
        inference_plan=require_file(inference_plan, "inference plan") if inference_plan is not None else None,
    )
    members, postprocessing = load_members(source, site, state)
    ending = members[0].plans.file_ending
    n_cases = len({p.name.rsplit("_", 1)[0] for p in require_dir(images, "image folder").iterdir() if p.name.endswith(ending)})
    with reporter.progress("predict", n_cases) as advance:
        written = predict_folder_ensemble(members, images, output, device=device, mirror=mirror, progress=advance,
                                          save_probabilities=save_probabilities, postprocessing=postprocessing,
                                          max_voxels=max_voxels, precision=precision)
    reporter.log(f"wrote {len(written)} segmentations to {output} ({len(members)} model(s))")
    if as_json:
        from fedseg.cli.console import print_json

        print_json({"output": str(output), "site": site, "models": len(members), "written": [str(p) for p in written]})


def evaluate(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted label maps."),
    ref: Path = typer.Option(..., "--ref", help="Folder of reference label maps (same file names)."),
    dataset: Path = typer.Option(None, "--dataset", help="dataset.json naming the labels (default: ../dataset.json of --ref)."),
    output: Path = typer.Option(..., "-o", "--output", help="metrics.json to write."),
    max_voxels: int = MAX_VOXELS,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Dice, IoU, pixel accuracy and HD95 per case and label, with means.

    Example: fedseg evaluate --pred pred/site_a --ref sites/site_a/labelsTs -o metrics.json
    """
    from fedseg.cli.console import print_json
    from fedseg.data.dataset import load_dataset
    from fedseg.training.evaluation import evaluate_folders, format_table, save_metrics

    require_output_file(output, "metrics file")
    require_dir(pred, "prediction folder")
    require_dir(ref, "reference folder")
    ds = load_dataset(dataset.parent if dataset is not None else ref.parent)
    result = evaluate_folders(pred, ref, ds.labels, ds.file_ending, max_voxels=max_voxels)
    save_metrics(result, output)
    if as_json:
        print_json(result)
    elif not quiet:
        from rich.console import Console

        Console().print(format_table(result, name=f"{ds.root.name} ({ds.name})" if ds.name != ds.root.name else ds.root.name))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)

"""Each site's test split scored with the model it would use (imagesTs against labelsTs)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from fedseg.data.case_loading import check_case_sizes
from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.federation.run_folder import round_dir
from fedseg.federation.site_training import load_site_model
from fedseg.training.evaluation import evaluate_folders, save_metrics
from fedseg.training.inference import predict_folder

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.federation.single_machine import SimulationConfig


def no_progress(description: str, total: int | None):
    """A progress factory that shows nothing."""
    return contextlib.nullcontext(lambda *args, **kwargs: None)


def evaluate_sites(plans, run_dir: Path, site_dirs: dict[str, Path], config: SimulationConfig, progress_factory) -> dict[str, dict]:
    final = round_dir(run_dir, config.rounds)
    results = {}
    for name, path in site_dirs.items():
        result = evaluate_site(
            plans, name, path, final / f"{name}.safetensors", run_dir / "state" / name,
            run_dir / "report" / "predictions" / name, device=config.device, mirror=config.mirror,
            progress_factory=progress_factory, max_voxels=config.max_voxels, precision=config.precision,
        )
        if result is not None:
            save_metrics(result, run_dir / "report" / f"metrics_{name}.json")
            results[name] = result
    return results


def check_site_image_sizes(dataset, max_voxels: int) -> None:
    """Refuse (InputError naming the file) a site whose training or test images declare more
    than `max_voxels` voxels; reads headers only."""
    check_case_sizes(dataset.cases("Tr") + dataset.cases("Ts"), max_voxels)


def evaluate_site(
    plans, site: str, dataset_root: Path, weights_path: Path, state_dir: Path, predictions_dir: Path,
    device: str = "cpu", mirror: bool = False, progress_factory=None, max_voxels: int = DEFAULT_MAX_VOXELS,
    precision: str = "auto",
) -> dict | None:
    """Predict a site's test split (imagesTs) with the model it would use and score it against
    labelsTs; None when the site has no test split."""
    images, labels = Path(dataset_root) / "imagesTs", Path(dataset_root) / "labelsTs"
    if not images.is_dir() or not labels.is_dir():
        return None
    network = load_site_model(plans, site, weights_path, state_dir)
    n = len(list(labels.iterdir()))
    with (progress_factory or no_progress)(f"predict {site}", n) as advance:
        predict_folder(network, images, predictions_dir, plans, plans.configuration_for(site), device=device,
                       mirror=mirror, progress=advance, site=site, max_voxels=max_voxels, precision=precision)
    return evaluate_folders(predictions_dir, labels, plans.labels, plans.file_ending, max_voxels=max_voxels)

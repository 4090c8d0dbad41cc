"""Server-side evaluation: each server model of a round on the coordinator's own test set.

FLAMES keeps one model per imaging modality on the server and tests it on held-out images
of that modality from several organs (its Table 4). fedseg's equivalent: a test folder in
nnU-Net raw layout (dataset.json + imagesTs + labelsTs; `fedseg synth --preset flames`
writes one as `_server_test/`) on which every `round_r/models/<pool>.safetensors` predicts.

dataset.json may map each case to a modality (`case_modality`) and an organ (`case_organ`);
the metrics are then also reported per modality and per organ, so the MRI model can be
read on the MRI cases (its own modality) and every model on the whole mixed set.

A pool model is run through the network of one of the pool's sites (the first in name
order), with that site's local parameters from its state folder if the strategy keeps any.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseg.atomic import write_json_atomic
from fedseg.data.dataset import load_dataset
from fedseg.errors import InputError
from fedseg.federation.site_evaluation import no_progress
from fedseg.federation.site_training import load_site_model
from fedseg.federation.weightfile import open_weight_file
from fedseg.training.evaluation import evaluate_folders, save_metrics
from fedseg.training.inference import predict_folder

SERVER_TEST_DIR = "_server_test"
# dataset.json keys of a server test set that group its cases (case id -> group name).
CASE_GROUP_KEYS = {"modality": "case_modality", "organ": "case_organ"}
METRICS = ("dice", "iou", "accuracy", "hd95")


def is_server_test_set(folder: Path) -> bool:
    return (Path(folder) / "dataset.json").is_file() and (Path(folder) / "labelsTs").is_dir()


def pool_model_files(round_dir: Path) -> list[Path]:
    folder = Path(round_dir) / "models"
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def evaluate_server_models(
    plans: Any,
    round_dir: Path,
    server_dir: Path,
    out_dir: Path,
    state_root: Path | None = None,
    device: str = "cpu",
    mirror: bool = False,
    progress_factory: Callable | None = None,
) -> dict[str, Any]:
    """Predict the server test set with every pool model of `round_dir`; returns the summary.

    Predictions go to `out_dir/server_predictions/<model>/`; the summary (also returned) to
    `out_dir/server_metrics.json`:
        {"server_test": ..., "round": r, "n_cases": N,
         "models": {<model>: {"pool", "sites", "all": {metric: mean}, "by_modality": {...}, "by_organ": {...}}}}
    Each entry of "all"/"by_*" holds the foreground means over its cases and "n_cases".
    """
    server_dir, out_dir = Path(server_dir), Path(out_dir)
    groupings = case_groupings(server_dir, plans)
    labels_dir = server_dir / "labelsTs"
    n_cases = len([p for p in labels_dir.iterdir() if p.name.endswith(plans.file_ending)])
    progress_factory = progress_factory or no_progress
    summary: dict[str, Any] = {"server_test": str(server_dir), "round": None, "n_cases": n_cases, "models": {}}
    for path in pool_model_files(round_dir):
        with open_weight_file(path) as reader:   # metadata only; load_site_model checks the file
            meta = reader.meta
        summary["round"] = meta.round
        sites = sorted(s for s in (meta.extra.get("sites") or plans.sites) if s in plans.sites)
        if not sites:
            continue
        site = sites[0]
        state_dir = Path(state_root) / site if state_root is not None else None
        network = load_site_model(plans, site, path, state_dir if state_dir is not None and state_dir.is_dir() else None)
        name = path.name[: -len(".safetensors")]
        pred_dir = out_dir / "server_predictions" / name
        with progress_factory(f"server test: model {name}", n_cases) as advance:
            predict_folder(network, server_dir / "imagesTs", pred_dir, plans, plans.configuration_for(site),
                           device=device, mirror=mirror, progress=advance)
        result = evaluate_folders(pred_dir, labels_dir, plans.labels, plans.file_ending)
        save_metrics(result, out_dir / f"server_metrics_{name}.json")
        summary["models"][name] = {"pool": meta.site, "sites": sites, **grouped_means(result, groupings)}
    write_json_atomic(out_dir / "server_metrics.json", summary)
    return summary


def case_groupings(server_dir: Path, plans: Any) -> dict[str, dict[str, str]]:
    """The server test set's case groupings (grouping -> case id -> group) from its dataset.json,
    refusing a test set whose labels or file ending are not the plan's."""
    dataset = load_dataset(server_dir)
    if dataset.labels != plans.labels:
        raise InputError(f"labels {dataset.labels} differ from the plan's {plans.labels}", server_dir / "dataset.json")
    if dataset.file_ending != plans.file_ending:
        raise InputError(f"file_ending {dataset.file_ending!r} differs from the plan's {plans.file_ending!r}",
                         server_dir / "dataset.json")
    return {
        name: {str(k): str(v) for k, v in dataset.raw[key].items()}
        for name, key in CASE_GROUP_KEYS.items()
        if isinstance(dataset.raw.get(key), dict)
    }


def grouped_means(result: dict[str, Any], groupings: dict[str, dict[str, str]]) -> dict[str, Any]:
    """{"all": means, "by_<grouping>": {group: means}} of one model's evaluate_folders result."""
    entry: dict[str, Any] = {"all": subset_means(result, None)}
    for grouping, mapping in groupings.items():
        entry[f"by_{grouping}"] = {
            group: subset_means(result, {c for c, g in mapping.items() if g == group})
            for group in sorted(set(mapping.values()))
        }
    return entry


def subset_means(result: dict[str, Any], cases: set[str] | None) -> dict[str, Any]:
    """Foreground means over the cases in `cases` (all when None), from evaluate_folders' per-case table.

    Per case, the foreground labels' values are averaged first (as evaluate_folders'
    "foreground_mean"), then the cases; undefined (NaN/None) values are left out.
    """
    labels = result.get("labels") or {}
    foreground = [name for name, value in labels.items() if value != 0]   # a region (a list) is foreground
    rows = [row for row in result["per_case"] if cases is None or row["case"] in cases]
    out: dict[str, Any] = {"n_cases": len(rows)}
    for metric in METRICS:
        case_values = []
        for row in rows:
            values = [_finite(row["metrics"][name].get(metric)) for name in foreground]
            values = [v for v in values if v is not None]
            if values:
                case_values.append(sum(values) / len(values))
        out[metric] = sum(case_values) / len(case_values) if case_values else None
    return out


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and value not in (float("inf"), float("-inf")) else None


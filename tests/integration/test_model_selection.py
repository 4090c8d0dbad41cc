"""Federated model selection end to end: 3 sites, 5 folds x 2 configurations (tiny preset),
driven by scripts/model_selection_example.sh exactly as the docs show it.

- find-best's choice (from the sites' numbers) equals the choice made from all validation
  predictions pooled centrally (only a test can see them all);
- every file the coordinator receives holds no case name, no voxel and no prediction.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
CONFIGURATIONS = ("2d", "3d_fullres")
FOLDS = range(5)
ROUNDS, ITERATIONS = 2, 6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def selection_run(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("model_selection")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "model_selection_example.sh"), str(tiny_sites), str(work), str(ROUNDS), str(ITERATIONS)],
        capture_output=True, text=True, env=env, timeout=3000,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def _sites(tiny_sites: Path) -> list[str]:
    return sorted(p.name for p in tiny_sites.iterdir() if (p / "dataset.json").is_file())


def _pooled_choice(work: Path, tiny_sites: Path) -> tuple[str, dict[str, float], bool]:
    """nnU-Net's choice computed the centralised way: predict every validation case of every
    fold with each configuration's fold model, pool the per-case Dice of all sites, average."""
    from fedseg.data.case_loading import load_case
    from fedseg.data.dataset import load_dataset
    from fedseg.federation.site_training import load_site_model
    from fedseg.planning.plans import load_plans
    from fedseg.training.inference import predict_case_probabilities

    per_case: dict[str, list[float]] = {"2d": [], "3d_fullres": [], "2d+3d_fullres": []}
    largest_by: dict[str, list[float]] = {name: [] for name in per_case}
    for site in _sites(tiny_sites):
        cases = {c.case_id: c for c in load_dataset(tiny_sites / site).cases("Tr")}
        for fold in FOLDS:
            probs_by_config = {}
            splits = json.loads((work / "runs" / "3d_fullres" / f"fold_{fold}" / "state" / site / "splits_final.json").read_text())
            val = splits[fold]["val"]
            for config in CONFIGURATIONS:
                run = work / "runs" / config / f"fold_{fold}"
                plans = load_plans(run / "plans.json")
                network = load_site_model(plans, site, run / f"round_{ROUNDS:03d}" / f"{site}.safetensors", None)
                probs_by_config[config] = [
                    predict_case_probabilities(network, load_case(cases[c]), plans, plans.configuration_for(site), site=site)
                    for c in val
                ]
            for index, case_id in enumerate(val):
                ref = load_case(cases[case_id]).seg
                for name in per_case:
                    parts = name.split("+")
                    probs = sum(probs_by_config[p][index] for p in parts) / len(parts)
                    pred = np.argmax(probs, axis=0)
                    per_case[name].append(_dice(pred == 1, ref == 1))
                    components, n = ndimage.label(pred == 1, structure=np.ones((3, 3, 3)))
                    if n > 1:
                        sizes = np.bincount(components.ravel())[1:]
                        pred = np.where(components == 1 + int(np.argmax(sizes)), pred, 0)
                    largest_by[name].append(_dice(pred == 1, ref == 1))
    means = {name: float(np.nanmean(values)) for name, values in per_case.items()}
    best = max(sorted(means, key=lambda n: (len(n.split("+")), n)), key=lambda n: means[n])
    keep = float(np.nanmean(largest_by[best])) > means[best]
    return best, means, keep


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return float("nan") if total == 0 else 2.0 * int((pred & ref).sum()) / total


def test_find_best_chooses_as_pooled_validation_predictions_would(selection_run: Path, tiny_sites: Path) -> None:
    plan = json.loads((selection_run / "selection" / "inference_plan.json").read_text())
    best, means, keep = _pooled_choice(selection_run, tiny_sites)
    assert plan["chosen"] == best, (plan["candidates"], means)
    for name, mean in means.items():
        assert plan["candidates"][name]["foreground_mean_dice"] == pytest.approx(mean, abs=1e-9)
        assert plan["candidates"][name]["n_cases"] == 3 * 8
    assert plan["postprocessing"]["largest_foreground"] == keep
    assert len(plan["models"]) == 5 * len(plan["members"])
    assert plan["command"].startswith("fedseg predict --inference-plan ")
    for site in _sites(tiny_sites):
        metrics = json.loads((selection_run / "predictions" / f"{site}.metrics.json").read_text())
        assert metrics["n_cases"] == 4 and metrics["foreground_mean"]["dice"] > 0.5


def test_best_round_recorded_in_every_fold(selection_run: Path) -> None:
    for config in CONFIGURATIONS:
        for fold in FOLDS:
            run = selection_run / "runs" / config / f"fold_{fold}"
            scored = [json.loads((run / f"round_{r:03d}" / "aggregate.json").read_text())["validation"] for r in (1, 2)]
            assert [s["scored_round"] for s in scored] == [0, 1]
            # 8 cases per site in 5 folds: folds 0-2 validate on 2 cases per site, folds 3-4 on 1
            assert all(s["fold"] == str(fold) and s["n_cases"] == 3 * (2 if fold < 3 else 1) for s in scored)
            best = json.loads((run / "best" / "best.json").read_text())
            assert best["mean_dice"] == max(s["mean_dice"] for s in scored)


def test_coordinator_receives_no_case_name_voxel_or_prediction(selection_run: Path, tiny_sites: Path) -> None:
    """Every file that travels from a site to the coordinator: fingerprints, every update of
    every round, fold and configuration, and the validation files."""
    from fedseg.federation.manifest import expected_parameters
    from fedseg.planning.plans import load_plans

    case_names = {p.name.split(".")[0] for site in _sites(tiny_sites) for p in (tiny_sites / site / "labelsTr").iterdir()}
    assert len(case_names) == 8   # the tiny preset names each site's cases case_000 ... case_007
    received = sorted((selection_run / "validation").glob("*.json"))
    assert len(received) == 3
    n_updates = 0
    for config in CONFIGURATIONS:
        for fold in FOLDS:
            run = selection_run / "runs" / config / f"fold_{fold}"
            plans = load_plans(run / "plans.json")
            received += sorted((run / "fingerprints").glob("*.json"))
            for update in sorted(run.glob("round_*/updates/*")):
                n_updates += 1
                received.append(update)
                header = _safetensors_header(update)
                metadata = header.pop("__metadata__")
                manifest = expected_parameters(plans, update.stem)
                for name, info in header.items():   # only network parameters, at their planned shapes
                    assert tuple(info["shape"]) == manifest[name][0], (update, name)
                extra = json.loads(metadata["extra"])
                # numbers only: Dice, loss, fold, counts, the loss/lr curve (at most 32 points
                # each) and the sha256 of the model the update started from
                assert set(extra) <= {
                    "val_dice", "mean_loss", "fold", "incoming_val_dice", "n_val_cases", "curve", "started_from",
                }
                assert re.fullmatch(r"[0-9a-f]{64}", extra["started_from"])
                assert all(len(v) <= 32 and all(isinstance(x, (int, float)) for x in v) for v in extra["curve"].values())
    assert n_updates == 2 * 5 * ROUNDS * 3
    for path in received:
        data = path.read_bytes()
        for name in case_names:
            assert name.encode() not in data, f"{path} names case {name}"
        if path.suffix == ".json":
            _assert_no_voxel_arrays(json.loads(data), path)


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def _assert_no_voxel_arrays(obj, path: Path, limit: int = 4096) -> None:
    """No array in a JSON file is long enough to hold an image or label map (the smallest
    tiny volume has more than 14^3 voxels); histograms of the fingerprint are the longest."""
    if isinstance(obj, dict):
        for value in obj.values():
            _assert_no_voxel_arrays(value, path, limit)
    elif isinstance(obj, list):
        assert len(obj) < limit, f"{path}: an array of {len(obj)} values"
        for value in obj:
            _assert_no_voxel_arrays(value, path, limit)
    else:
        assert obj is None or isinstance(obj, (bool, int, float, str)) and (not isinstance(obj, float) or math.isfinite(obj))

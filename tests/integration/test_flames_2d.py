"""2D end to end with FLAMES, through the command line, for PNG and for 2D NIfTI datasets:
synth -> fingerprint -> plan (2d) -> init -> train -> aggregate -> predict (site model and
modality server model) -> evaluate; and `simulate` finding the server test set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg.cli.main import run
from fedseg.data.image_io import read_image
from fedseg.synth import generate, write_site
from fedseg.synth.presets.flames import FLAMES_SITES, SERVER_TEST, flames_site

# Two MRI sites (a group of 2: personalised weights) and one ultrasound site (a group of 1).
SITES = ("mri_a", "mri_b", "us_breast")


def make_sites(root: Path, ending: str) -> None:
    for site in SITES:
        write_site(root / site, site, flames_site(site, FLAMES_SITES.index(site), 0, file_ending=ending, n_train=3, n_test=2))
    write_site(root / SERVER_TEST, SERVER_TEST, flames_site(SERVER_TEST, 0, 0, file_ending=ending, n_test=2))


def ok(argv: list[str]) -> None:
    assert run(argv) == 0, argv


@pytest.mark.parametrize("ending", [".png", ".nii.gz"])
def test_flames_2d_pipeline(tmp_path: Path, ending: str) -> None:
    sites = tmp_path / "sites"
    make_sites(sites, ending)
    # the files really are 2D: PNG, or NIfTI with two dimensions and the site's spacing
    image, geometry = read_image(next((sites / "us_breast" / "imagesTr").iterdir()))
    assert geometry.is_2d and image.shape == (1, 64, 64)
    if ending == ".nii.gz":
        assert geometry.spacing[1:] == (0.5, 0.5)

    fps = []
    for site in SITES:
        fp = tmp_path / "fp" / f"{site}.json"
        ok(["fingerprint", "--site", site, "--data", str(sites / site), "-o", str(fp), "-q"])
        fps.append(str(fp))
    plans_path = tmp_path / "plans.json"
    ok(["plan", *fps, "--strategy", "flames", "-o", str(plans_path), "--config", "2d", "-q",
        "--set", "training.rounds=1", "--set", "configuration.batch_size=2"])
    plans = json.loads(plans_path.read_text())
    assert plans["default_configuration"] == "2d"
    assert plans["training"]["loss"] == "dice_focal"          # flames' default loss
    assert {s: i["modality"] for s, i in plans["sites"].items()} == {"mri_a": "MRI", "mri_b": "MRI", "us_breast": "US"}

    run_dir = tmp_path / "run"
    ok(["init", "--plans", str(plans_path), "-o", str(run_dir / "round_000"), "-q"])
    assert sorted(p.name for p in (run_dir / "round_000" / "models").iterdir()) == ["MRI.safetensors", "US.safetensors"]
    updates = []
    for site in SITES:
        update = run_dir / "round_001" / "updates" / f"{site}.safetensors"
        ok(["train", "--site", site, "--data", str(sites / site), "--plans", str(plans_path),
            "--weights", str(run_dir / "round_000" / f"{site}.safetensors"), "--state", str(tmp_path / "state" / site),
            "-o", str(update), "--iterations", "2", "--workers", "0", "-q"])
        updates.append(str(update))
    ok(["aggregate", "--plans", str(plans_path), *updates, "-o", str(run_dir / "round_001"), "-q"])
    report = json.loads((run_dir / "round_001" / "aggregate.json").read_text())
    assert set(report["weights"]) == {"group:MRI", "group:US"}

    # predict with a site's personalised model and with its modality's server model; evaluate both
    for weights in (run_dir / "round_001" / "mri_a.safetensors", run_dir / "round_001" / "models" / "MRI.safetensors"):
        pred = tmp_path / "pred" / weights.stem
        ok(["predict", "--plans", str(plans_path), "--weights", str(weights), "--site", "mri_a",
            "-i", str(sites / "mri_a" / "imagesTs"), "-o", str(pred), "-q"])
        written = sorted(pred.iterdir())
        assert [p.name for p in written] == [f"case_003{ending}", f"case_004{ending}"]
        seg, seg_geometry = read_image(written[0])
        assert seg_geometry.is_2d and seg.shape == (1, 64, 64) and set(np.unique(seg)) <= {0.0, 1.0}
        metrics = tmp_path / f"metrics_{weights.stem}.json"
        ok(["evaluate", "--pred", str(pred), "--ref", str(sites / "mri_a" / "labelsTs"), "-o", str(metrics), "-q"])
        result = json.loads(metrics.read_text())
        assert result["n_cases"] == 2 and set(result["foreground_mean"]) >= {"dice", "iou", "accuracy"}

    # the server model of one modality runs on the mixed server test set too
    pred = tmp_path / "pred_server"
    ok(["predict", "--plans", str(plans_path), "--weights", str(run_dir / "round_001" / "models" / "US.safetensors"),
        "--site", "us_breast", "-i", str(sites / SERVER_TEST / "imagesTs"), "-o", str(pred), "-q"])
    assert len(list(pred.iterdir())) == 6


def test_simulate_skips_the_server_test_set_and_reports_server_models(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    make_sites(sites, ".png")
    ok(["simulate", str(sites), "--strategy", "flames", "--rounds", "1", "--iterations", "1", "--workers", "0",
        "--set", "configuration.batch_size=2", "-o", str(tmp_path / "run"), "-q"])
    plans = json.loads((tmp_path / "run" / "plans.json").read_text())
    assert sorted(plans["sites"]) == sorted(SITES)          # `_server_test` is not a site
    server = json.loads((tmp_path / "run" / "report" / "server_metrics.json").read_text())
    assert server["n_cases"] == 6 and server["round"] == 1
    assert sorted(server["models"]) == ["MRI", "US"]
    mri = server["models"]["MRI"]
    assert mri["pool"] == "group:MRI" and mri["sites"] == ["mri_a", "mri_b"]
    assert mri["all"]["n_cases"] == 6
    assert {k: v["n_cases"] for k, v in mri["by_modality"].items()} == {"MRI": 2, "US": 4}
    assert {k: v["n_cases"] for k, v in mri["by_organ"].items()} == {"brain": 2, "breast": 2, "ovary": 2}
    assert (tmp_path / "run" / "report" / "server_predictions" / "US").is_dir()


def test_flames_preset_has_two_modalities_and_a_server_test_set(tmp_path: Path) -> None:
    from fedseg.data.dataset import load_dataset

    written = generate(tmp_path, preset="flames", seed=0)
    assert [p.name for p in written] == list(FLAMES_SITES)
    modalities = {p.name: load_dataset(p).modality for p in written if p.name != SERVER_TEST}
    assert modalities == {"mri_a": "MRI", "mri_b": "MRI", "mri_c": "MRI", "us_breast": "US", "us_ovary": "US"}
    counts = {name: load_dataset(tmp_path / name).num_training for name in modalities}
    assert min(counts[s] for s in ("mri_a", "mri_b", "mri_c")) > 3 * max(counts["us_breast"], counts["us_ovary"])
    server = load_dataset(tmp_path / SERVER_TEST)
    assert len(server.cases("Ts")) == 30 and set(server.raw["case_modality"].values()) == {"MRI", "US"}
    # the lesion is bright in MRI and dark in ultrasound (the domain shift the preset is about)
    for site, sign in (("mri_a", 1), ("us_breast", -1)):
        case = load_dataset(tmp_path / site).cases("Tr")[0]
        image, _ = read_image(case.images[0])
        label, _ = read_image(case.label)
        inside, outside = image[label > 0].mean(), image[(label == 0) & (image > 0)].mean()
        assert sign * (inside - outside) > 20

"""Every raw format nnU-Net v2 reads, and region-based labels, through fingerprint -> plan ->
train -> predict -> evaluate (`fedseg simulate`, one round of one iteration on 16^3 volumes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_format_sites import BRATS_LABELS, SIZE, TIFF_SPACING, make_site

from fedseg.cli.main import run
from fedseg.data.case_loading import load_case
from fedseg.data.dataset import load_dataset
from fedseg.data.image_io import Geometry, read_channels, read_image, write_image, write_segmentation
from fedseg.errors import InputError
from fedseg.planning.plans import load_plans

THREE_D_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gipl", ".tif", ".tiff")


@pytest.mark.parametrize("ending", THREE_D_ENDINGS)
def test_3d_round_trip_keeps_values_and_spacing(tmp_path: Path, ending: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(-100, 100, (5, 6, 7)).astype(np.float32)
    label = rng.integers(0, 3, (5, 6, 7)).astype(np.uint8)
    spacing = (2.0, 1.0, 0.5)
    geometry = Geometry((5, 6, 7), spacing, (), (), False)
    write_image(image, geometry, tmp_path / f"c_0000{ending}")
    write_segmentation(label, geometry, tmp_path / f"c{ending}")
    data, geo = read_channels(tmp_path / f"c_0000{ending}")
    seg, seg_geo = read_image(tmp_path / f"c{ending}")
    assert data.shape == (1, 5, 6, 7) and data.dtype == np.float32
    np.testing.assert_allclose(data[0], image, rtol=1e-6)
    np.testing.assert_array_equal(seg, label)
    assert geo.spacing == spacing and seg_geo.spacing == spacing and not geo.is_2d


def test_tiff_spacing_follows_nnunets_json_convention(tmp_path: Path) -> None:
    geometry = Geometry((4, 5, 6), (3.0, 1.0, 1.0), (), (), False)
    write_image(np.zeros((4, 5, 6), np.float32), geometry, tmp_path / "case_0000.tif")
    # a channel file's spacing file drops the channel suffix; a label's keeps the case name
    assert json.loads((tmp_path / "case.json").read_text()) == {"spacing": [3.0, 1.0, 1.0]}
    (tmp_path / "case.json").write_text(json.dumps({"spacing": [5.0, 0.5, 0.25]}))
    assert read_channels(tmp_path / "case_0000.tif")[1].spacing == (5.0, 0.5, 0.25)
    (tmp_path / "case.json").unlink()
    assert read_channels(tmp_path / "case_0000.tif")[1].spacing == (1.0, 1.0, 1.0)   # nnU-Net's default
    (tmp_path / "case.json").write_text(json.dumps({"spacing": [1, -1, 1]}))
    with pytest.raises(InputError, match="three positive numbers") as info:
        read_channels(tmp_path / "case_0000.tif")
    assert info.value.path == tmp_path / "case.json"


@pytest.mark.parametrize("ending", [".png", ".tif"])
def test_rgb_image_is_three_channels_of_one_file(tmp_path: Path, ending: str) -> None:
    site = make_site(tmp_path / "site", ending, rgb=True)
    dataset = load_dataset(site)
    case = dataset.cases("Tr")[0]
    assert [p.name for p in case.images] == [f"case_tr00_0000{ending}"]
    loaded = load_case(case, dataset.label_values)
    assert loaded.data.shape == (3, 1, SIZE, SIZE) and loaded.geometry.spacing == (999.0, 1.0, 1.0)
    red, green = loaded.data[0], loaded.data[1]
    np.testing.assert_array_equal(green, 255 - red)   # channels in R, G, B order
    raw = json.loads((site / "dataset.json").read_text())
    raw["channel_names"] = {"0": "R", "1": "G"}
    (site / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="hold 3 channel"):
        load_case(load_dataset(site).cases("Tr")[0])


def _simulate(sites: Path, run_dir: Path, *extra: str) -> dict:
    rc = run(["simulate", str(sites), "--rounds", "1", "--iterations", "1", "--workers", "0", "-o", str(run_dir),
              "-q", "--set", "configuration.batch_size=1", *extra])
    assert rc == 0
    return json.loads((run_dir / "report" / "metrics_site_a.json").read_text())


PIPELINE_CASES = {
    ".nii": {},
    ".nrrd": {},
    ".mha": {},
    ".mhd": {},
    ".gipl": {},
    ".tif 3D": {"ending": ".tif"},
    ".tiff": {},
    ".bmp": {},
    ".png RGB": {"ending": ".png", "rgb": True},
    ".tif RGB": {"ending": ".tif", "rgb": True},
}


@pytest.mark.parametrize("name", sorted(PIPELINE_CASES))
def test_each_format_through_the_whole_pipeline(tmp_path: Path, name: str) -> None:
    options = dict(PIPELINE_CASES[name])
    ending = options.pop("ending", name)
    make_site(tmp_path / "sites" / "site_a", ending, **options)
    metrics = _simulate(tmp_path / "sites", tmp_path / "run")
    plans = load_plans(tmp_path / "run" / "plans.json")
    assert plans.file_ending == ending
    assert plans.n_channels == (3 if options.get("rgb") else 1)
    prediction = tmp_path / "run" / "report" / "predictions" / "site_a" / f"case_ts00{ending}"
    seg, geometry = read_image(prediction)
    reference_geometry = read_image(tmp_path / "sites" / "site_a" / "labelsTs" / f"case_ts00{ending}")[1]
    assert geometry.shape == reference_geometry.shape and geometry.spacing == reference_geometry.spacing
    assert set(np.unique(seg)) <= {0, 1}
    if ending in (".tif", ".tiff") and not geometry.is_2d:
        assert geometry.spacing == tuple(TIFF_SPACING)   # read from, and written to, the spacing file
    assert metrics["n_cases"] == 1 and set(metrics["mean"]) == {"background", "blob"}


def test_region_based_labels_train_sigmoid_regions_and_evaluate_regions(tmp_path: Path) -> None:
    make_site(tmp_path / "sites" / "site_a", ".nii.gz", regions=True)
    metrics = _simulate(tmp_path / "sites", tmp_path / "run")
    plans = load_plans(tmp_path / "run" / "plans.json")
    assert plans.labels == BRATS_LABELS and plans.regions_class_order == [1, 2, 3]
    assert plans.n_classes == 3   # one sigmoid output per foreground region, no background output
    fingerprint = json.loads((tmp_path / "run" / "fingerprints" / "site_a.json").read_text())
    assert fingerprint["regions_class_order"] == [1, 2, 3]
    # evaluation scores the three regions (not background, not single label values)
    assert set(metrics["mean"]) == {"whole tumor", "tumor core", "enhancing tumor"}
    assert metrics["labels"]["tumor core"] == [2, 3]
    seg = read_image(tmp_path / "run" / "report" / "predictions" / "site_a" / "case_ts00.nii.gz")[0]
    assert set(np.unique(seg)) <= {0, 1, 2, 3}


def test_region_labels_refused_where_they_cannot_be_trained(tmp_path: Path, capsys) -> None:
    site = make_site(tmp_path / "site_a", ".nii.gz", regions=True, n_train=1, n_test=0)
    assert run(["fingerprint", "--site", "site_a", "--data", str(site), "-o", str(tmp_path / "fp.json"), "-q"]) == 0
    capsys.readouterr()
    rc = run(["plan", str(tmp_path / "fp.json"), "--strategy", "flames", "-o", str(tmp_path / "plans.json"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "region-based labels" in err and not (tmp_path / "plans.json").exists()
    raw = json.loads((site / "dataset.json").read_text())
    del raw["regions_class_order"]
    (site / "dataset.json").write_text(json.dumps(raw))
    rc = run(["fingerprint", "--site", "site_a", "--data", str(site), "-o", str(tmp_path / "fp2.json"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "regions_class_order" in err and str(site / "dataset.json") in err


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gipl", ".tif"])
def test_truncated_file_is_refused_naming_it_with_nothing_else_on_stderr(tmp_path: Path, capfd, ending: str) -> None:
    rng = np.random.default_rng(0)
    target = tmp_path / f"c_0000{ending}"
    write_image(rng.uniform(0, 100, (8, 8, 8)).astype(np.float32), Geometry((8, 8, 8), (1.0, 1.0, 1.0), (), (), False),
                target)
    data_file = target.with_suffix(".zraw") if ending == ".mhd" else target   # a MetaImage header names its data file
    data_file.write_bytes(data_file.read_bytes()[:-300])
    with pytest.raises(InputError) as info:
        read_channels(target)
    assert info.value.path == target
    assert capfd.readouterr().err == ""   # ITK's and tifffile's own complaints are not printed

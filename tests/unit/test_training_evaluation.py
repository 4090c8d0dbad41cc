"""Folder evaluation: pairing by file name, errors naming the file, JSON with NaN as null."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedseg.data.image_io import Geometry, write_segmentation
from fedseg.errors import InputError
from fedseg.training.evaluation import evaluate_folders, format_table, save_metrics

LABELS = {"background": 0, "lesion": 1, "cyst": 2}
SPACING = (2.0, 1.0, 0.5)


def _geometry(shape=(8, 10, 12), spacing=SPACING) -> Geometry:
    return Geometry(shape, spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), False)


@pytest.fixture
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    geo = _geometry()
    # case a: lesion predicted perfectly, no cyst in either (cyst Dice undefined)
    ref_a = np.zeros(geo.shape, np.int16)
    ref_a[2:5, 2:6, 3:9] = 1
    pred_a = ref_a.copy()
    # case b: lesion half-overlapping, cyst missed
    ref_b = np.zeros(geo.shape, np.int16)
    ref_b[1:5, 1:5, 1:5] = 1
    ref_b[6:8, 6:9, 8:11] = 2
    pred_b = np.zeros(geo.shape, np.int16)
    pred_b[1:5, 1:5, 3:7] = 1
    for name, pred, ref in (("a", pred_a, ref_a), ("b", pred_b, ref_b)):
        write_segmentation(pred, geo, pred_dir / f"{name}.nii.gz")
        write_segmentation(ref, geo, ref_dir / f"{name}.nii.gz")
    return pred_dir, ref_dir


def test_evaluate_folders_scores_every_case_and_averages_ignoring_nan(folders):
    pred_dir, ref_dir = folders
    calls = []
    result = evaluate_folders(pred_dir, ref_dir, LABELS, ".nii.gz", progress=lambda n=1, info="": calls.append(info))
    assert calls == ["a", "b"]
    assert result["n_cases"] == 2
    assert [c["case"] for c in result["per_case"]] == ["a", "b"]
    a, b = (c["metrics"] for c in result["per_case"])
    assert a["lesion"]["dice"] == 1.0 and a["lesion"]["hd95"] == 0.0
    assert math.isnan(a["cyst"]["dice"]) and math.isnan(a["cyst"]["hd95"])
    assert b["lesion"]["dice"] == pytest.approx(0.5)
    assert b["cyst"]["dice"] == 0.0
    # Missed structure: HD95 is the image diagonal in mm.
    assert b["cyst"]["hd95"] == pytest.approx(math.sqrt((8 * 2.0) ** 2 + 10**2 + (12 * 0.5) ** 2))
    mean = result["mean"]
    assert mean["lesion"]["dice"] == pytest.approx(0.75)
    assert mean["cyst"]["dice"] == 0.0  # case a's NaN is excluded, not counted as 1 or 0
    fg = result["foreground_mean"]
    assert fg["dice"] == pytest.approx((0.75 + 0.0) / 2)
    assert set(fg) == {"dice", "iou", "accuracy", "hd95"}


def test_save_metrics_writes_strict_json_with_null_for_nan(folders, tmp_path):
    pred_dir, ref_dir = folders
    result = evaluate_folders(pred_dir, ref_dir, LABELS, ".nii.gz")
    out = tmp_path / "out" / "metrics.json"
    save_metrics(result, out)
    text = out.read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["per_case"][0]["metrics"]["cyst"]["dice"] is None
    assert loaded["mean"]["lesion"]["dice"] == pytest.approx(0.75)
    assert not list(out.parent.glob(".*tmp"))


def test_all_nan_label_has_null_mean(tmp_path):
    geo = _geometry()
    ref = np.zeros(geo.shape, np.int16)
    ref[2:4, 2:4, 2:4] = 1
    write_segmentation(ref, geo, tmp_path / "p" / "x.nii.gz")
    write_segmentation(ref, geo, tmp_path / "r" / "x.nii.gz")
    result = evaluate_folders(tmp_path / "p", tmp_path / "r", LABELS, ".nii.gz")
    assert math.isnan(result["mean"]["cyst"]["dice"])
    assert result["foreground_mean"]["dice"] == 1.0  # the undefined cyst mean does not drag it to NaN


def test_missing_prediction_names_the_file(folders):
    pred_dir, ref_dir = folders
    (pred_dir / "b.nii.gz").unlink()
    with pytest.raises(InputError, match="b.nii.gz") as info:
        evaluate_folders(pred_dir, ref_dir, LABELS, ".nii.gz")
    assert info.value.path == pred_dir / "b.nii.gz"


def test_shape_mismatch_names_the_prediction(folders):
    pred_dir, ref_dir = folders
    write_segmentation(np.zeros((8, 10, 11), np.int16), _geometry((8, 10, 11)), pred_dir / "a.nii.gz")
    with pytest.raises(InputError, match="shape") as info:
        evaluate_folders(pred_dir, ref_dir, LABELS, ".nii.gz")
    assert info.value.path == pred_dir / "a.nii.gz"


def test_extra_predictions_are_ignored_and_empty_reference_folder_is_an_error(folders, tmp_path):
    pred_dir, ref_dir = folders
    write_segmentation(np.zeros((8, 10, 12), np.int16), _geometry(), pred_dir / "extra.nii.gz")
    assert evaluate_folders(pred_dir, ref_dir, LABELS, ".nii.gz")["n_cases"] == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no reference"):
        evaluate_folders(pred_dir, tmp_path / "empty", LABELS, ".nii.gz")


def test_format_table_lists_labels_and_foreground_mean(folders):
    from rich.console import Console

    pred_dir, ref_dir = folders
    table = format_table(evaluate_folders(pred_dir, ref_dir, LABELS, ".nii.gz"))
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    for word in ("lesion", "cyst", "background", "foreground mean", "0.7500"):
        assert word in text

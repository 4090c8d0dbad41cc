"""load_dataset / collect_cases / load_case: every fault is an InputError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg.data.case_loading import load_case
from fedseg.data.dataset import collect_cases, load_dataset
from fedseg.data.image_io import Geometry, read_image, write_image, write_segmentation
from fedseg.errors import InputError

SHAPE = (8, 10, 12)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _geometry(shape: tuple[int, int, int] = SHAPE, spacing: tuple[float, float, float] = (2.0, 1.0, 1.0)) -> Geometry:
    return Geometry(shape, spacing, (0.0, 0.0, 0.0), IDENTITY, False)


def _write_dataset(root: Path, n_channels: int = 2, n_cases: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        for c in range(n_channels):
            write_image(rng.normal(size=SHAPE).astype(np.float32), _geometry(), root / "imagesTr" / f"c{i}_{c:04d}.nii.gz")
        seg = np.zeros(SHAPE, np.uint8)
        seg[2:5, 3:7, 4:8] = 1
        write_segmentation(seg, _geometry(), root / "labelsTr" / f"c{i}.nii.gz")
    meta = {"channel_names": {str(c): f"T{c + 1}" for c in range(n_channels)},
            "labels": {"background": 0, "lesion": 1}, "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _load_first(root: Path):
    ds = load_dataset(root)
    return load_case(ds.cases()[0], ds.label_values)


def test_valid_dataset_loads(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    ds = load_dataset(root)
    assert ds.n_channels == 2 and ds.label_values == [0, 1] and ds.modality == "MRI"
    cases = ds.cases()
    assert [c.case_id for c in cases] == ["c0", "c1"]
    data = load_case(cases[0], ds.label_values)
    assert data.data.shape == (2, *SHAPE) and data.seg.shape == SHAPE and data.seg.dtype == np.int16
    assert data.geometry.spacing == (2.0, 1.0, 1.0)
    assert ds.cases("Ts") == []


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}), "missing key"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"bg": 1}, "numTraining": 1, "file_ending": ".nii.gz"}),
         "background = 0"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": -1}, "numTraining": 1,
                     "file_ending": ".nii.gz"}), "non-negative"),
        (json.dumps({"channel_names": {"1": "CT"}, "labels": {"background": 0}, "numTraining": 1,
                     "file_ending": ".nii.gz"}), "0..N-1"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": 1,
                     "file_ending": ".jpg"}), "not supported"),
    ],
)
def test_bad_dataset_json(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(InputError, match=match) as info:
        load_dataset(tmp_path)
    assert info.value.path == tmp_path / "dataset.json"


def test_missing_dataset_json_or_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no dataset.json"):
        load_dataset(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_missing_channel_names_the_expected_file(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    (root / "imagesTr" / "c1_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="missing channel 1") as info:
        load_dataset(root).cases()
    assert info.value.path == root / "imagesTr" / "c1_0001.nii.gz"


def test_missing_label_file(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    (root / "labelsTr" / "c0.nii.gz").unlink()
    with pytest.raises(InputError, match="label file missing") as info:
        load_dataset(root).cases()
    assert info.value.path == root / "labelsTr" / "c0.nii.gz"


def test_no_cases(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    for path in (root / "imagesTr").iterdir():
        path.unlink()
    with pytest.raises(InputError, match="no cases") as info:
        load_dataset(root).cases()
    assert info.value.path == root / "imagesTr"
    with pytest.raises(InputError, match="no cases"):
        collect_cases(root / "imagesTr", None, ".nii.gz", 1, False)


def test_shape_mismatch_between_channels_and_label(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    bad = root / "imagesTr" / "c0_0001.nii.gz"
    write_image(np.ones((8, 10, 11), np.float32), _geometry((8, 10, 11)), bad)
    with pytest.raises(InputError, match="differs from") as info:
        _load_first(root)
    assert info.value.path == bad
    _write_dataset(root)  # restore, then break the label
    label = root / "labelsTr" / "c0.nii.gz"
    write_segmentation(np.zeros((8, 10, 11), np.uint8), _geometry((8, 10, 11)), label)
    with pytest.raises(InputError, match="label shape") as info:
        _load_first(root)
    assert info.value.path == label


def test_spacing_mismatch(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    label = root / "labelsTr" / "c0.nii.gz"
    write_segmentation(np.zeros(SHAPE, np.uint8), _geometry(spacing=(3.0, 1.0, 1.0)), label)
    with pytest.raises(InputError, match="spacing") as info:
        _load_first(root)
    assert info.value.path == label


def test_nan_image(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    image = np.zeros(SHAPE, np.float32)
    image[1, 2, 3] = np.nan
    bad = root / "imagesTr" / "c0_0000.nii.gz"
    write_image(image, _geometry(), bad)
    with pytest.raises(InputError, match="NaN") as info:
        _load_first(root)
    assert info.value.path == bad


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_read_image_gives_simpleitks_voxels_and_geometry(tmp_path: Path, dtype) -> None:
    """Float NIfTI is decompressed once (nibabel voxels, ITK header): same result as ITK's reader."""
    import SimpleITK as sitk

    array = (np.random.default_rng(1).normal(size=SHAPE) * 100).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.7, 2.0))
    image.SetOrigin((1.0, -2.0, 3.5))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))   # rotated axes
    path = tmp_path / "img.nii.gz"
    sitk.WriteImage(image, str(path))
    data, geometry = read_image(path)
    expected = sitk.ReadImage(str(path))
    assert data.dtype == np.float32 and data.flags.c_contiguous
    np.testing.assert_array_equal(data, sitk.GetArrayFromImage(expected).astype(np.float32))
    assert geometry.spacing == tuple(expected.GetSpacing()[::-1]) and geometry.origin == expected.GetOrigin()
    assert geometry.direction == expected.GetDirection() and not geometry.is_2d


def test_label_value_not_in_dataset_json(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path)
    seg = np.zeros(SHAPE, np.uint8)
    seg[0, 0, 0] = 3
    label = root / "labelsTr" / "c0.nii.gz"
    write_segmentation(seg, _geometry(), label)
    with pytest.raises(InputError, match=r"\[3\] not in dataset.json") as info:
        _load_first(root)
    assert info.value.path == label


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_image(tmp_path: Path, ending: str) -> None:
    path = tmp_path / f"img{ending}"
    write_image(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32), _geometry((16, 16, 16)), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated") as info:
        read_image(path)
    assert info.value.path == path


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "img.nii.gz"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError) as info:
        read_image(path)
    assert info.value.path == path


def test_image_io_round_trip_nifti_3d(tmp_path: Path) -> None:
    geometry = Geometry((6, 7, 9), (2.5, 0.75, 0.5), (10.0, -4.0, 3.0), IDENTITY, False)
    data = np.random.default_rng(1).normal(size=geometry.shape).astype(np.float32)
    write_image(data, geometry, tmp_path / "a.nii.gz")
    back, geo = read_image(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(back, data)
    assert geo.shape == geometry.shape and not geo.is_2d
    np.testing.assert_allclose(geo.spacing, geometry.spacing)
    np.testing.assert_allclose(geo.origin, geometry.origin)
    assert Geometry.from_dict(json.loads(json.dumps(geo.to_dict()))) == geo
    seg = (data > 0).astype(np.uint8) * 3
    write_segmentation(seg, geo, tmp_path / "s.nii.gz")
    back_seg, _ = read_image(tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(back_seg, seg)


def test_image_io_round_trip_png_2d(tmp_path: Path) -> None:
    geometry = Geometry((1, 12, 15), (999.0, 1.0, 1.0), (), (), True)
    image = np.random.default_rng(2).integers(0, 256, size=(1, 12, 15)).astype(np.float32)
    write_image(image, geometry, tmp_path / "a.png")
    back, geo = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(back, image)
    assert geo.is_2d and geo.shape == (1, 12, 15) and geo.spacing == (999.0, 1.0, 1.0)
    seg = (image > 128).astype(np.uint8)
    write_segmentation(seg, geometry, tmp_path / "s.png")
    np.testing.assert_array_equal(read_image(tmp_path / "s.png")[0], seg)

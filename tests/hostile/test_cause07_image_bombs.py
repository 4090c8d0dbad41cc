"""Image bombs: a tiny file whose header declares an enormous image.

Every command that reads images checks the declared size against `--max-voxels` (default
2^30) before decompressing a voxel: exit 2, one line naming the file, nothing written.
The bombs here are a few hundred bytes: headers declaring 2^31 voxels with almost no data.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedseg.cli.main import run
from fedseg.data.image_io import Geometry, write_segmentation

BOMB_SHAPE_XYZ = (1024, 1024, 2048)   # 2^31 voxels, 2 GiB as uint8, 8 GiB as float32


def nifti_bomb(path: Path) -> Path:
    """A NIfTI header declaring 2^31 uint8 voxels, followed by 16 bytes of data (gzip'd for .nii.gz)."""
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(BOMB_SHAPE_XYZ)
    header.set_data_dtype(np.uint8)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    body = header.binaryblock + b"\x00" * 4 + b"\x00" * 16
    path.write_bytes(gzip.compress(body) if path.name.endswith(".gz") else body)
    return path


def metaimage_bomb(path: Path) -> Path:
    dims = " ".join(str(d) for d in BOMB_SHAPE_XYZ)
    path.write_bytes(
        f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = MET_UCHAR\n"
        f"ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n".encode() + b"\x00" * 16
    )
    return path


def nrrd_bomb(path: Path) -> Path:
    dims = " ".join(str(d) for d in BOMB_SHAPE_XYZ)
    path.write_bytes(
        f"NRRD0004\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\nsizes: {dims}\nencoding: raw\nspace directions: "
        f"(1,0,0) (0,1,0) (0,0,1)\n\n".encode() + b"\x00" * 16
    )
    return path


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height greyscale pixels, with one truncated IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def bmp_bomb(path: Path) -> Path:
    width, height = 65536, 32768   # 2^31 pixels
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\x00" * 16)
    return path


def tiff_bomb(path: Path) -> Path:
    """A baseline TIFF whose one IFD declares a 65536 x 32768 greyscale page, with 16 bytes of strip data."""
    width, height = 65536, 32768
    tags = [  # (tag, type: 3 SHORT / 4 LONG, count, value), sorted by tag as TIFF requires
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, 0), (278, 4, 1, height), (279, 4, 1, width * height),
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHII", tag, kind, count, data_offset if tag == 273 else value) if kind == 4
        else struct.pack("<HHIHH", tag, kind, count, value, 0)
        for tag, kind, count, value in tags
    )
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(tags)) + entries
                     + b"\x00" * 4 + b"\x00" * 16)
    return path


BOMBS = {
    ".nii.gz": nifti_bomb,
    ".nii": nifti_bomb,
    ".mha": metaimage_bomb,
    ".nrrd": nrrd_bomb,
    ".png": lambda p: png_with_size(p, 65536, 32768),
    ".bmp": bmp_bomb,
    ".tif": tiff_bomb,
}


def assert_refused(capsys: pytest.CaptureFixture, rc: int, path: Path, fragment: str = "") -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedseg: error: "), err
    assert "Traceback" not in err and "Warning" not in err, err
    assert str(path) in err and fragment in err, err
    return err


def bomb_dataset(root: Path, ending: str) -> Path:
    """A one-case dataset whose only channel file is a bomb (the label is a small valid image)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "numTraining": 1, "file_ending": ending,
    }))
    bomb = BOMBS[ending](root / "imagesTr" / f"case_0000{ending}")
    is_2d = ending in (".png", ".bmp")
    shape = (1, 4, 4) if is_2d else (4, 4, 4)
    geometry = Geometry(shape, (999.0 if is_2d else 1.0, 1.0, 1.0), (), (), is_2d)
    write_segmentation(np.zeros(shape, dtype=np.uint8), geometry, root / "labelsTr" / f"case{ending}")
    return bomb


@pytest.mark.parametrize("ending", sorted(BOMBS))
def test_fingerprint_refuses_a_bomb_of_every_format(tmp_path: Path, capsys: pytest.CaptureFixture, ending: str) -> None:
    bomb = bomb_dataset(tmp_path / "site", ending)
    out = tmp_path / "fp.json"
    rc = run(["fingerprint", "--site", "a", "--data", str(tmp_path / "site"), "-o", str(out), "-q"])
    assert_refused(capsys, rc, bomb, "2147483648 voxels")
    assert not out.exists()


def test_max_voxels_lowers_the_limit_for_an_honest_image(tiny_sites: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fp.json"
    rc = run(["fingerprint", "--site", "a", "--data", str(tiny_sites / "site_a"), "-o", str(out), "-q",
              "--max-voxels", "100"])
    err = assert_refused(capsys, rc, tiny_sites / "site_a" / "imagesTr", "above the limit of 100")
    assert "--max-voxels" in err
    assert not out.exists()


def test_png_between_pillow_limits_is_read_without_a_warning(tmp_path: Path, capsys) -> None:
    """10^8 pixels: under fedseg's limit, over Pillow's warning threshold (8.9e7): Pillow's
    DecompressionBombWarning must not reach stderr; the truncated data is then reported."""
    bomb_dataset(tmp_path / "site", ".png")
    bomb = png_with_size(tmp_path / "site" / "imagesTr" / "case_0000.png", 10_000, 10_000)
    rc = run(["fingerprint", "--site", "a", "--data", str(tmp_path / "site"), "-o", str(tmp_path / "fp.json"), "-q"])
    assert_refused(capsys, rc, bomb, "cannot read image")


def test_png_above_pillows_hard_limit_is_refused_naming_the_file(tmp_path: Path, capsys) -> None:
    bomb_dataset(tmp_path / "site", ".png")
    bomb = png_with_size(tmp_path / "site" / "imagesTr" / "case_0000.png", 20_000, 20_000)
    rc = run(["fingerprint", "--site", "a", "--data", str(tmp_path / "site"), "-o", str(tmp_path / "fp.json"), "-q"])
    assert_refused(capsys, rc, bomb, "Pillow")


@pytest.fixture(scope="module")
def planned(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """plans.json and round-0 weights of a one-site federation of site_a (tiny)."""
    root = tmp_path_factory.mktemp("bomb_plan")
    assert run(["fingerprint", "--site", "site_a", "--data", str(tiny_sites / "site_a"), "-o", str(root / "fp.json"), "-q"]) == 0
    assert run(["plan", str(root / "fp.json"), "-o", str(root / "plans.json"), "-q",
                "--set", "training.iterations_per_round=2"]) == 0
    assert run(["init", "--plans", str(root / "plans.json"), "-o", str(root / "round_000"), "-q"]) == 0
    return {"plans": root / "plans.json", "weights": root / "round_000" / "site_a.safetensors"}


def test_predict_refuses_a_bomb_before_predicting_any_case(tiny_sites: Path, planned, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(tiny_sites / "site_a" / "imagesTs", images)   # honest cases first in order...
    bomb = nifti_bomb(images / "zzz_0000.nii.gz")                  # ...the bomb last
    out = tmp_path / "pred"
    rc = run(["predict", "--plans", str(planned["plans"]), "--weights", str(planned["weights"]),
              "-i", str(images), "-o", str(out), "-q"])
    assert_refused(capsys, rc, bomb, "2147483648 voxels")
    assert not out.exists() or not any(out.iterdir())


def test_train_refuses_a_bomb_and_writes_no_update(tiny_sites: Path, planned, tmp_path: Path, capsys) -> None:
    site = tmp_path / "site_a"
    shutil.copytree(tiny_sites / "site_a", site)
    bomb = nifti_bomb(site / "imagesTr" / "case_003_0000.nii.gz")
    update = tmp_path / "round_001" / "updates" / "site_a.safetensors"
    rc = run(["train", "--site", "site_a", "--data", str(site), "--plans", str(planned["plans"]),
              "--weights", str(planned["weights"]), "--state", str(tmp_path / "state"), "-o", str(update),
              "--workers", "0", "-q"])
    assert_refused(capsys, rc, bomb, "2147483648 voxels")
    assert not update.exists()
    assert not list((tmp_path / "state").rglob("*.npz"))   # no case was preprocessed


def test_evaluate_refuses_a_bomb_prediction(tiny_sites: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred"
    shutil.copytree(tiny_sites / "site_a" / "labelsTs", pred)
    bomb = nifti_bomb(pred / sorted(p.name for p in pred.iterdir())[-1])
    out = tmp_path / "metrics.json"
    rc = run(["evaluate", "--pred", str(pred), "--ref", str(tiny_sites / "site_a" / "labelsTs"),
              "-o", str(out), "-q"])
    assert_refused(capsys, rc, bomb, "2147483648 voxels")
    assert not out.exists()


def test_simulate_refuses_a_bomb_before_its_first_round(tiny_sites: Path, tmp_path: Path, capsys) -> None:
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    bomb = nifti_bomb(sites / "site_b" / "imagesTr" / "case_000_0000.nii.gz")
    run_dir = tmp_path / "run"
    rc = run(["simulate", str(sites), "--rounds", "1", "--iterations", "1", "--workers", "0", "-o", str(run_dir), "-q"])
    assert_refused(capsys, rc, bomb, "2147483648 voxels")
    assert not run_dir.exists() or not [p for p in run_dir.rglob("*") if p.is_file()]

"""Every malformed input through the real CLI: exit 2, one line naming the file, no traceback,
nothing written (`fedseg aggregate`, `fedseg train`'s weight checks, `fedseg fingerprint`)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from test_federation_engine import BATTERY, _rewrite, make_plans, write_updates

from fedseg.cli.main import run
from fedseg.federation.weightfile import read_weight_file


def assert_refused(capsys: pytest.CaptureFixture, rc: int, names: Path | str, fragment: str = "") -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedseg: error: "), err
    assert "Traceback" not in err
    assert str(names) in err and fragment in err, err
    return err


def aggregate(plans_path: Path, files, out: Path, *extra: str) -> int:
    return run(["aggregate", "--plans", str(plans_path), *map(str, files), "-o", str(out), "-q", *extra])


def setup_round(tmp_path: Path, params: dict | None = None):
    plans = make_plans(params=params)
    plans_path = tmp_path / "plans.json"
    plans.save(plans_path)
    return plans, plans_path, write_updates(plans, tmp_path)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent-dir/pwned"),))


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps(_Evil()))


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 7)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-9])


def _flipped(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _npy(path: Path) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    path.write_bytes(buffer.getvalue())


FILE_FAULTS = {
    "pickle renamed": (_pickle, "pickle"),
    "npy renamed": (_npy, ".npy"),
    "garbage": (_garbage, "not a safetensors weight file"),
    "truncated": (_truncated, "truncated"),
    "flipped byte": (_flipped, "content hash mismatch"),
}


@pytest.mark.parametrize("case", sorted(BATTERY) + sorted(FILE_FAULTS))
def test_aggregate_battery(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    _plans, plans_path, paths = setup_round(tmp_path)
    victim = paths["B"]
    if case in BATTERY:
        change, fragment = BATTERY[case]
        _rewrite(victim, change[0]) if isinstance(change, tuple) else _rewrite(victim, **change)
    else:
        corrupt, fragment = FILE_FAULTS[case]
        corrupt(victim)
    out = tmp_path / "round_001"
    assert_refused(capsys, aggregate(plans_path, paths.values(), out), victim, fragment)
    assert not out.exists()


def test_duplicate_unknown_and_norm_faults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans, plans_path, paths = setup_round(tmp_path)
    out = tmp_path / "round_001"
    copy = tmp_path / "again.safetensors"
    shutil.copy(paths["A"], copy)
    assert_refused(capsys, aggregate(plans_path, [*paths.values(), copy], out), copy, "second update")
    assert_refused(capsys, aggregate(plans_path, [tmp_path / "nope.safetensors"], out), "nope.safetensors", "not found")
    assert_refused(capsys, aggregate(plans_path, [tmp_path], out), tmp_path, "")
    # the norm bound is a plan option; each update here has norm > 1
    _plans, bounded_path, bounded = setup_round(tmp_path / "bounded", {"max_update_norm": 1.0})
    assert_refused(capsys, aggregate(bounded_path, bounded.values(), out), bounded["A"], "max_update_norm")
    assert not out.exists()


def test_edited_plan_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _plans, plans_path, paths = setup_round(tmp_path)
    body = json.loads(plans_path.read_text())
    body["strategy"]["params"]["robust"] = "median"   # changing the rule after planning changes plan_id
    plans_path.write_text(json.dumps(body))
    out = tmp_path / "round_001"
    assert_refused(capsys, aggregate(plans_path, paths.values(), out), plans_path, "plan_id does not match")
    assert not out.exists()


def test_train_refuses_bad_weights_before_training(tmp_path: Path, tiny_sites: Path, capsys: pytest.CaptureFixture) -> None:
    """`train` checks the incoming model (format, hash, plan) before it touches the data."""
    plans, plans_path, paths = setup_round(tmp_path)
    site_data = next(p for p in sorted(tiny_sites.iterdir()) if p.is_dir())
    for corrupt, fragment in ((_pickle, "pickle"), (_flipped, "content hash mismatch")):
        weights = tmp_path / "in.safetensors"
        shutil.copy(paths["A"], weights)
        corrupt(weights)
        out = tmp_path / "upd" / "A.safetensors"
        rc = run(["train", "--site", "A", "--data", str(site_data), "--plans", str(plans_path), "--weights", str(weights),
                  "--state", str(tmp_path / "state"), "-o", str(out), "-q"])
        assert_refused(capsys, rc, weights, fragment)
        assert not out.exists() and not (tmp_path / "state").exists()
    # an update is not a model to start from
    rc = run(["train", "--site", "A", "--data", str(site_data), "--plans", str(plans_path), "--weights", str(paths["A"]),
              "--state", str(tmp_path / "state"), "-o", str(tmp_path / "u.safetensors"), "-q"])
    assert_refused(capsys, rc, paths["A"], "starts from a model file")


def _no_json(site: Path) -> None:
    (site / "dataset.json").unlink()


def _bad_json(site: Path) -> None:
    (site / "dataset.json").write_text("{")


def _corrupt_image(site: Path) -> None:
    sorted((site / "imagesTr").iterdir())[0].write_bytes(b"not a nifti file")


def _missing_label(site: Path) -> None:
    sorted((site / "labelsTr").iterdir())[0].unlink()


def _label_shape(site: Path) -> None:
    from fedseg.data.image_io import Geometry, write_segmentation

    label = sorted((site / "labelsTr").iterdir())[0]
    write_segmentation(np.zeros((3, 4, 5), np.uint8), Geometry((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                               (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), False), label)


def _nan_image(site: Path) -> None:
    from fedseg.data.image_io import read_image, write_image

    image = sorted((site / "imagesTr").iterdir())[0]
    data, geometry = read_image(image)
    data[0, 0, 0] = np.nan
    write_image(data, geometry, image)


def _bad_label_value(site: Path) -> None:
    from fedseg.data.image_io import read_image, write_segmentation

    label = sorted((site / "labelsTr").iterdir())[0]
    data, geometry = read_image(label)
    data[0, 0, 0] = 7
    write_segmentation(data.astype(np.uint8), geometry, label)


DATASET_FAULTS = {
    "no dataset.json": (_no_json, "dataset.json"),
    "broken dataset.json": (_bad_json, "dataset.json"),
    "corrupt image": (_corrupt_image, "case_000_0000"),
    "missing label": (_missing_label, "case_000"),
    "label shape": (_label_shape, "shape"),
    "NaN image": (_nan_image, ""),
    "unknown label value": (_bad_label_value, "7"),
}


@pytest.mark.parametrize("case", sorted(DATASET_FAULTS))
def test_malformed_datasets(tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    site = tmp_path / "site"
    shutil.copytree(next(p for p in sorted(tiny_sites.iterdir()) if p.is_dir()), site)
    corrupt, fragment = DATASET_FAULTS[case]
    corrupt(site)
    out = tmp_path / "fp.json"
    rc = run(["fingerprint", "--site", "s", "--data", str(site), "-o", str(out), "-q"])
    assert_refused(capsys, rc, site, fragment)
    assert not out.exists()


def test_refusals_read_no_data_after_the_first_fault(tmp_path: Path) -> None:
    """The pickle test's payload would create a file if unpickled: it never is."""
    _plans, _plans_path, paths = setup_round(tmp_path)
    _pickle(paths["A"])
    with pytest.raises(Exception):
        read_weight_file(paths["A"])

"""Hostile tensor bytes: a file is checked against the plan's manifest (names, shapes, dtypes,
byte ranges inside the file) from its header alone, before a tensor byte is read.

Every reader: `predict` and `train` (the incoming model), `aggregate` (the updates),
`inspect`. Each case: exit 2, one line naming the file, nothing written.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from weight_forgery import (
    GIB,
    add_stowaway,
    assert_refused,
    federation,
    listing,
    read_header,
    round_model,
    write_raw,
)

from fedseg.cli.main import run
from fedseg.federation.weightfile import WeightMeta, read_weight_file, write_weight_file


def _predict(plans_path: Path, weights: Path, tmp_path: Path) -> int:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    return run(["predict", "--plans", str(plans_path), "--weights", str(weights), "-i", str(images),
                "-o", str(tmp_path / "pred"), "--site", "A", "-q"])


def _train(plans_path: Path, weights: Path, tmp_path: Path, data: Path) -> int:
    return run(["train", "--site", "A", "--data", str(data), "--plans", str(plans_path), "--weights", str(weights),
                "--state", str(tmp_path / "state"), "-o", str(tmp_path / "upd" / "A.safetensors"), "-q"])


def _first_float(header: dict) -> str:
    return next(n for n, e in sorted(header.items()) if n != "__metadata__" and e["dtype"] == "F32")


def _wrong_shape(path: Path) -> None:
    """A self-consistent file (valid layout and hash) whose bias has 5 entries, not 4."""
    tensors, meta = read_weight_file(path)
    tensors["encoder.stages.0.conv.bias"] = np.zeros(5, np.float32)
    fields = {k: v for k, v in meta.__dict__.items() if k != "content_hash"}
    write_weight_file(path, tensors, WeightMeta(**fields))


def _wrong_dtype(path: Path) -> None:
    header, data = read_header(path)
    name = _first_float(header)
    header[name]["dtype"] = "I32"   # same size, another dtype
    write_raw(path, header, data)


def _overlap(path: Path) -> None:
    header, data = read_header(path)
    entries = sorted((e["data_offsets"][0], n) for n, e in header.items() if n != "__metadata__")
    second = header[entries[1][1]]
    second["data_offsets"] = [second["data_offsets"][0] - 4, second["data_offsets"][1] - 4]   # overlaps the first
    write_raw(path, header, data)


def _trailing(path: Path) -> None:
    header, data = read_header(path)
    write_raw(path, header, data + b"\x00" * 64)


def _past_the_end(path: Path) -> None:
    header, data = read_header(path)
    write_raw(path, header, data[:-4])


def _flipped(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))


def _stowaway(path: Path) -> None:
    add_stowaway(path, 3 * GIB // 2)


MODEL_FAULTS = {
    "extra 1.5 GiB tensor": (_stowaway, "not parameters of site 'A'"),
    "shape differs from the manifest": (_wrong_shape, "is float32[5], the plan expects float32[4]"),
    "dtype differs from the manifest": (_wrong_dtype, "is int32"),
    "byte ranges overlap": (_overlap, "does not start where the previous one ends"),
    "trailing bytes": (_trailing, "trailing bytes"),
    "data past the end": (_past_the_end, "truncated"),
    "flipped byte": (_flipped, "content hash mismatch"),
}


@pytest.mark.parametrize("case", sorted(MODEL_FAULTS))
def test_predict_checks_the_model_file_before_reading_tensors(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    plans, plans_path, updates = federation(tmp_path)
    model = round_model(tmp_path, plans, updates)
    corrupt, fragment = MODEL_FAULTS[case]
    corrupt(model)
    assert_refused(capsys, _predict(plans_path, model, tmp_path), model, fragment)
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("case", ["extra 1.5 GiB tensor", "shape differs from the manifest", "flipped byte"])
def test_train_checks_the_incoming_model_before_reading_tensors(
    tmp_path: Path, tiny_sites: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    plans, plans_path, updates = federation(tmp_path)
    model = round_model(tmp_path, plans, updates)
    corrupt, fragment = MODEL_FAULTS[case]
    corrupt(model)
    data = next(p for p in sorted(tiny_sites.iterdir()) if p.is_dir())
    assert_refused(capsys, _train(plans_path, model, tmp_path, data), model, fragment)
    assert not (tmp_path / "upd").exists() and not (tmp_path / "state").exists()


def test_aggregate_refuses_a_stowaway_tensor_from_the_header(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _plans, plans_path, updates = federation(tmp_path)
    add_stowaway(updates["B"], 3 * GIB // 2)
    out = tmp_path / "round_001"
    rc = run(["aggregate", "--plans", str(plans_path), *map(str, updates.values()), "-o", str(out), "-q"])
    assert_refused(capsys, rc, updates["B"], "stowaway")
    assert not out.exists()


@pytest.mark.parametrize("case", ["byte ranges overlap", "trailing bytes", "data past the end", "flipped byte"])
def test_inspect_refuses_inconsistent_byte_ranges(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    plans, _plans_path, updates = federation(tmp_path)
    model = round_model(tmp_path, plans, updates)
    corrupt, fragment = MODEL_FAULTS[case]
    corrupt(model)
    before = listing(tmp_path)
    assert_refused(capsys, run(["inspect", str(model)]), model, fragment)
    assert listing(tmp_path) == before


def test_a_stowaway_tensor_costs_no_memory(tmp_path: Path) -> None:
    """What `predict`/`train` run on the incoming model, in a fresh process: refusing a file
    that declares an extra 1.5 GiB tensor must not page in or copy it (peak RSS stays that
    of an idle interpreter with numpy, far below the tensor)."""
    plans, plans_path, updates = federation(tmp_path)
    model = round_model(tmp_path, plans, updates)
    add_stowaway(model, 3 * GIB // 2)
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from fedseg.errors import InputError
        from fedseg.federation.site_update import compose_site_state
        from fedseg.planning.plans import load_plans
        try:
            compose_site_state(load_plans(sys.argv[1]), "A", sys.argv[2], None)
        except InputError as exc:
            print("refused:", exc)
        # VmHWM: this process's own peak (ru_maxrss would include the forking parent's)
        print(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(plans_path), str(model)],
                          capture_output=True, text=True, timeout=120, check=True)
    refusal, peak_kib = done.stdout.strip().splitlines()
    assert "not parameters of site 'A'" in refusal
    assert int(peak_kib) < 300 * 1024, f"peak RSS {int(peak_kib) // 1024} MiB"

"""Hostile sizes: a weight file's header is capped in bytes and entries before it is parsed,
and clip_norm holds O(model) memory whatever the number of sites.

Each refusal: exit 2, one line naming the file, nothing written, in well under a second
(parsing the 60 MB header used to take 14 s and 1 GB per input).
"""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from weight_forgery import assert_refused, federation, listing, make_plans

from fedseg.cli.main import run
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.site_update import write_site_update
from fedseg.federation.weightfile import MAX_HEADER_BYTES, MAX_TENSORS, WeightMeta, write_weight_file

_ENTRY = b'"t%07d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'


def _header_file(path: Path, n_entries: int) -> Path:
    """A well-formed safetensors file whose header holds `n_entries` empty tensors."""
    text = b"{" + b",".join(_ENTRY % i for i in range(n_entries)) + b"}"
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    return path


@pytest.fixture(scope="module")
def huge_header(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 MB of header, a million entries (far above MAX_HEADER_BYTES)."""
    path = _header_file(tmp_path_factory.mktemp("huge") / "huge.safetensors", 1_000_000)
    assert path.stat().st_size > 60_000_000
    return path


@pytest.fixture(scope="module")
def many_entries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A header under the byte cap (~11 MB) with 3x MAX_TENSORS entries."""
    path = _header_file(tmp_path_factory.mktemp("many") / "many.safetensors", 3 * MAX_TENSORS)
    assert path.stat().st_size < MAX_HEADER_BYTES
    return path


@pytest.fixture(autouse=True)
def no_large_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (exit 1, not 2) if the weight file reader parses more than 1 MiB of JSON at once:
    an oversized header must be refused before it is parsed."""
    import fedseg.federation.weightfile as weightfile

    parse = weightfile.json.loads

    def guarded(text, *args, **kwargs):
        assert len(text) <= 1 << 20, f"parsed {len(text)} bytes of header"
        return parse(text, *args, **kwargs)

    monkeypatch.setattr(weightfile.json, "loads", guarded)


@pytest.fixture(scope="module")
def many_lists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One entry whose shape is 5 million empty lists: a 15 MiB header (under the byte cap)
    that would parse into ~400 MB of Python lists over seconds."""
    text = b'{"a":{"dtype":"F32","shape":[' + b",".join([b"[]"] * 5_000_000) + b'],"data_offsets":[0,0]}}'
    text += b" " * (-len(text) % 8)
    path = tmp_path_factory.mktemp("lists") / "lists.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    assert path.stat().st_size < MAX_HEADER_BYTES
    return path


def _timed(argv: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    rc = run(argv)
    return rc, time.perf_counter() - start


@pytest.mark.parametrize("which, fragment", [("huge_header", "header length"), ("many_entries", "too large for 65,536 tensor entries"),
                                            ("many_lists", "too large for 65,536 tensor entries")])
def test_inspect_refuses_oversized_headers_without_parsing(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture, which: str, fragment: str
) -> None:
    path = request.getfixturevalue(which)
    rc, seconds = _timed(["inspect", str(path)])
    assert_refused(capsys, rc, path, fragment)
    assert seconds < 2.0, f"{seconds:.2f} s"


@pytest.mark.parametrize("which, fragment", [("huge_header", "header length"), ("many_entries", "too large for 65,536 tensor entries"),
                                            ("many_lists", "too large for 65,536 tensor entries")])
def test_aggregate_refuses_each_oversized_header_fast(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture, which: str, fragment: str
) -> None:
    """Three sites each send the hostile header: the first is refused, and opening all three
    costs milliseconds (a header is refused before it is parsed, per input)."""
    _plans, plans_path, updates = federation(tmp_path)
    for path in updates.values():
        path.unlink()
        os.link(request.getfixturevalue(which), path)
    out = tmp_path / "round_001"
    rc, seconds = _timed(["aggregate", "--plans", str(plans_path), *map(str, updates.values()), "-o", str(out), "-q"])
    assert_refused(capsys, rc, updates["A"], fragment)
    assert seconds < 2.0, f"{seconds:.2f} s"
    assert not out.exists()


def test_predict_refuses_an_oversized_header(tmp_path: Path, capsys: pytest.CaptureFixture, huge_header: Path) -> None:
    _plans, plans_path, _updates = federation(tmp_path)
    (tmp_path / "images").mkdir()
    before = listing(tmp_path)
    rc = run(["predict", "--plans", str(plans_path), "--weights", str(huge_header), "-i", str(tmp_path / "images"),
              "-o", str(tmp_path / "pred"), "--site", "A", "-q"])
    assert_refused(capsys, rc, huge_header, "header length")
    assert listing(tmp_path) == before


# -- clip_norm: O(model) memory, not O(sites x model) --------------------------------------
BIG = 1 << 18   # float32 values in the large tensor: 1 MiB
CLIP_MANIFEST = {
    "big.weight": {"shape": [BIG], "dtype": "float32"},
    "small.bias": {"shape": [8], "dtype": "float32"},
}
MODEL_BYTES = 4 * (BIG + 8)


def _clip_round(folder: Path, n_sites: int) -> int:
    """Aggregate one clip_norm round of `n_sites` (every delta clipped); peak traced bytes."""
    sites = {f"s{i:02d}": 10 + i for i in range(n_sites)}
    plans = make_plans({"clip_norm": 0.5}, manifest=CLIP_MANIFEST, sites=sites)
    previous = folder / "round_000"
    start = {name: np.zeros(e["shape"], np.float32) for name, e in CLIP_MANIFEST.items()}
    paths = []
    for i, site in enumerate(sorted(sites)):
        write_weight_file(previous / f"{site}.safetensors", start, WeightMeta(
            kind="model", plan_id=plans.plan_id, strategy="fedavg", site=site, round=0, n_cases=sites[site],
            n_iterations=0, scopes={n: "global" for n in start}))
        rng = np.random.default_rng(i)
        state = {n: rng.standard_normal(e["shape"]).astype(np.float32) for n, e in CLIP_MANIFEST.items()}
        path = folder / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, state, path, round_index=1, n_iterations=5)
        paths.append(path)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        report = aggregate_round(plans, paths, folder / "round_001")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(record.clip_factor < 0.01 for record in report.inputs)   # every site was clipped
    return peak


def test_clip_norm_memory_does_not_grow_with_sites(tmp_path: Path) -> None:
    """Going from 4 to 16 clipped sites adds less than one model of traced (non-file) memory;
    holding every site's clipped delta would add 12 float64 copies of the large tensor (24 MiB)."""
    few = _clip_round(tmp_path / "few", 4)
    many = _clip_round(tmp_path / "many", 16)
    assert many - few < MODEL_BYTES, f"4 sites {few / 2**20:.1f} MiB, 16 sites {many / 2**20:.1f} MiB"

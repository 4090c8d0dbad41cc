"""Weight-file format versions: version 2 hashes content with BLAKE3; version-1 files (sha256
content hash) written before stay readable, verifiable and, when signed, aggregatable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import blake3
import numpy as np
import pytest

from fedseg.errors import InputError
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.signing import sign_weight_file
from fedseg.federation.weightfile import WEIGHT_FORMAT_VERSION, WeightMeta, _save_safetensors, read_weight_file, write_weight_file
from tests.unit.test_federation_engine import flower_aggregate, make_plans, random_state
from tests.unit.test_federation_signing import key, keydir, keyed_plans  # noqa: F401 - keydir is a fixture

_TENSORS = {"w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.array([1.5, -2.0], np.float32)}


def _reference_hash(algorithm, domain: bytes, tensors: dict[str, np.ndarray], meta: WeightMeta) -> str:
    """The content hash as the format description defines it, computed independently."""
    body = asdict(meta)
    body.pop("content_hash")
    h = algorithm(domain + json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\x00")
    for name in sorted(tensors):
        array = tensors[name]
        h.update(json.dumps([name, array.dtype.name, list(array.shape)], separators=(",", ":")).encode() + b"\x00")
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def write_version_1(path: Path, tensors: dict[str, np.ndarray], meta: WeightMeta) -> WeightMeta:
    """A weight file as fedseg wrote it before format version 2 (sha256 content hash)."""
    meta = replace(meta, format_version=1, content_hash="")
    meta = replace(meta, content_hash=_reference_hash(hashlib.sha256, b"fedseg-weights-v1\x00", tensors, meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_safetensors(path, tensors, meta.to_metadata())
    return meta


def _meta(**overrides) -> WeightMeta:
    fields = dict(kind="update", plan_id="p" * 64, strategy="fedavg", site="A", round=1, n_cases=5, n_iterations=10,
                  scopes={"w": "global", "b": "global"})
    return WeightMeta(**{**fields, **overrides})


def test_new_files_are_version_2_with_a_blake3_content_hash(tmp_path: Path) -> None:
    written = write_weight_file(tmp_path / "u.safetensors", _TENSORS, _meta())
    assert WEIGHT_FORMAT_VERSION == 2 and written.format_version == 2
    assert written.content_hash == _reference_hash(blake3.blake3, b"fedseg-weights-v2\x00", _TENSORS, written)
    tensors, meta = read_weight_file(tmp_path / "u.safetensors")
    assert meta == written and all(np.array_equal(tensors[n], _TENSORS[n]) for n in _TENSORS)


def test_version_1_files_stay_readable_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    old = write_version_1(path, _TENSORS, _meta())
    tensors, meta = read_weight_file(path)
    assert meta == old and meta.format_version == 1
    assert all(np.array_equal(tensors[n], _TENSORS[n]) for n in _TENSORS)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01                      # a flipped byte of tensor data is still detected
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="content hash mismatch"):
        read_weight_file(path)


@pytest.mark.parametrize("signed", [False, True])
def test_a_round_of_version_1_and_version_2_updates_is_aggregated_like_flower(
    keydir: Path, tmp_path: Path, signed: bool  # noqa: F811 - the fixture
) -> None:
    from fedseg.federation.site_update import write_site_update

    plans = keyed_plans(keydir) if signed else make_plans()
    paths, results = [], []
    for i, site in enumerate(sorted(plans.sites)):
        path = tmp_path / "updates" / f"{site}.safetensors"
        signing = key(keydir, site) if signed else None
        meta = write_site_update(plans, site, random_state(i + 1), path, round_index=1, n_iterations=10, signing_key=signing)
        if i % 2 == 0:                    # every other site still sends the old format
            tensors, _ = read_weight_file(path)
            write_version_1(path, tensors, meta)
            if signed:
                sign_weight_file(path, signing)
        tensors, meta = read_weight_file(path)
        assert meta.format_version == (1 if i % 2 == 0 else 2)
        paths.append(path)
        results.append(([tensors[n] for n in sorted(tensors)], meta.n_cases))
    report = aggregate_round(plans, paths, tmp_path / "round_001", signing_key=key(keydir, "coordinator") if signed else None)
    # every input is named by its content hash; only version-1 inputs also by the sha256 of their bytes
    assert [i.content_hash for i in report.inputs] == [read_weight_file(p)[1].content_hash for p in paths]
    assert [i.sha256 for i in report.inputs] == [
        hashlib.sha256(p.read_bytes()).hexdigest() if k % 2 == 0 else None for k, p in enumerate(paths)]
    model, _ = read_weight_file(tmp_path / "round_001" / "models" / "global.safetensors")
    for name, expected in zip(sorted(model), flower_aggregate(results)):
        np.testing.assert_allclose(model[name], expected, rtol=1e-6, atol=1e-7)


def _pad_header(path: Path) -> None:
    """Eight more spaces of header padding: other file bytes, the same content."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes((n + 8).to_bytes(8, "little") + data[8:8 + n] + b" " * 8 + data[8 + n:])


def _signed_round(keydir: Path, tmp_path: Path, version_1: bool) -> tuple[object, list[Path]]:  # noqa: F811
    from fedseg.federation.site_update import write_site_update

    plans = keyed_plans(keydir)
    paths = []
    for i, site in enumerate(sorted(plans.sites)):
        path = tmp_path / "updates" / f"{site}.safetensors"
        meta = write_site_update(plans, site, random_state(i + 1), path, round_index=1, n_iterations=10,
                                 signing_key=key(keydir, site))
        if version_1:
            write_version_1(path, read_weight_file(path)[0], meta)
            sign_weight_file(path, key(keydir, site))
        paths.append(path)
    return plans, paths


def test_signed_version_1_update_with_other_bytes_but_the_signed_content_leaves_no_round(
    keydir: Path, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    """A signed version-1 file is checked by the sha256 of its bytes against the signed one:
    bytes that differ from the signed ones (here only the header's padding, so the content
    hash still matches) are refused and nothing is written."""
    plans, paths = _signed_round(keydir, tmp_path, version_1=True)
    _pad_header(paths[1])
    read_weight_file(paths[1])           # still a valid file with the signed content
    out = tmp_path / "round_001"
    with pytest.raises(InputError, match="differ from the signed ones \\(sha256 mismatch\\)") as caught:
        aggregate_round(plans, paths, out, signing_key=key(keydir, "coordinator"))
    assert caught.value.path == paths[1]
    assert not (out / "aggregate.json").exists() and not list(out.glob("*.safetensors"))


def test_signed_version_2_update_is_named_by_its_signed_content_hash(
    keydir: Path, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    """A version-2 signature signs the content hash, which the pass verifies: that is the file's
    identity in aggregate.json, so other header padding (the same content) is the same input,
    and a changed tensor byte is refused as bytes that differ from the signed ones."""
    plans, paths = _signed_round(keydir, tmp_path, version_1=False)
    signed = [read_weight_file(p)[1].content_hash for p in paths]
    _pad_header(paths[1])
    report = aggregate_round(plans, paths, tmp_path / "round_001", signing_key=key(keydir, "coordinator"))
    assert [i.content_hash for i in report.inputs] == signed and [i.sha256 for i in report.inputs] == [None] * len(paths)
    data = bytearray(paths[1].read_bytes())
    data[-5] ^= 0x10
    paths[1].write_bytes(bytes(data))
    out = tmp_path / "round_001b"
    with pytest.raises(InputError, match="differ from the signed ones \\(content hash mismatch\\)") as caught:
        aggregate_round(plans, paths, out, signing_key=key(keydir, "coordinator"))
    assert caught.value.path == paths[1] and not out.exists()

"""The weight file: roundtrip, never unpickling, corruption and tampering detection, fuzzing."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseg.errors import InputError
from fedseg.federation.weightfile import WeightMeta, open_weight_file, read_weight_file, write_weight_file


def _meta(**overrides) -> WeightMeta:
    base = dict(
        kind="update", plan_id="p" * 64, strategy="fedavg", site="A", round=1, n_cases=5, n_iterations=10,
        scopes={"w": "global", "b": "global"}, extra={"val_dice": 0.5},
    )
    base.update(overrides)
    return WeightMeta(**base)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "h": rng.standard_normal((2, 2)).astype(np.float16),
        "d": rng.standard_normal(3),
        "steps": np.array(7, dtype=np.int64),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
    }


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "A.safetensors"
    write_weight_file(path, _tensors(), _meta())
    return path


def test_roundtrip_preserves_tensors_and_metadata(valid_file: Path) -> None:
    tensors, meta = read_weight_file(valid_file)
    original = _tensors()
    assert set(tensors) == set(original)
    for name, array in original.items():
        assert tensors[name].dtype == array.dtype and tensors[name].shape == array.shape
        np.testing.assert_array_equal(tensors[name], array)
    assert meta.kind == "update" and meta.site == "A" and meta.round == 1 and meta.n_cases == 5
    assert meta.scopes == {"w": "global", "b": "global"} and meta.extra == {"val_dice": 0.5}
    assert len(meta.content_hash) == 64
    # each field is its own JSON string in safetensors metadata: plain safetensors can read it
    from safetensors import safe_open

    with safe_open(str(valid_file), framework="numpy") as handle:
        raw = handle.metadata()
    assert json.loads(raw["n_cases"]) == 5 and json.loads(raw["scopes"])["w"] == "global"
    from safetensors.numpy import load_file

    plain = load_file(str(valid_file))
    for name, array in original.items():
        assert plain[name].dtype == array.dtype
        np.testing.assert_array_equal(plain[name], array)


def test_write_is_deterministic_and_hash_depends_on_content(tmp_path: Path) -> None:
    m1 = write_weight_file(tmp_path / "a.safetensors", _tensors(), _meta())
    m2 = write_weight_file(tmp_path / "b.safetensors", _tensors(), _meta())
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    changed = _tensors()
    changed["w"][0, 0, 0] += 1
    m3 = write_weight_file(tmp_path / "c.safetensors", changed, _meta())
    m4 = write_weight_file(tmp_path / "d.safetensors", _tensors(), _meta(n_cases=6))
    assert m1.content_hash == m2.content_hash
    assert len({m1.content_hash, m3.content_hash, m4.content_hash}) == 3


def test_lazy_reader_gives_read_only_tensors(valid_file: Path) -> None:
    with open_weight_file(valid_file) as reader:
        assert reader.keys() == sorted(_tensors())
        assert reader.meta.site == "A"
        w = reader.get_tensor("w")
        np.testing.assert_array_equal(w, _tensors()["w"])
        with pytest.raises(ValueError):
            w[0, 0, 0] = 1.0
        reader.verify_hash()


def test_scopes_must_name_tensors_in_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_weight_file(tmp_path / "x.safetensors", {"w": np.zeros(2, np.float32)}, _meta(scopes={"nope": "global"}))
    assert not list(tmp_path.iterdir())


class _Evil:
    """Unpickling this creates the marker file: proof that a reader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _assert_refused(path: Path, fragment: str = "not a safetensors weight file") -> InputError:
    with pytest.raises(InputError) as info:
        read_weight_file(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_in_disguise_is_refused_without_unpickling(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=protocol)
    # sanity: the payload really would run code if unpickled
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    disguised = tmp_path / "update.safetensors"
    disguised.write_bytes(payload)
    _assert_refused(disguised)
    assert not marker.exists()


def test_torch_save_zip_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_Evil(marker)))
    path = tmp_path / "model.safetensors"
    path.write_bytes(buffer.getvalue())
    err = _assert_refused(path)
    assert "zip" in str(err)
    assert not marker.exists()


def test_pickle_behind_a_plausible_length_prefix_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(payload)) + payload)
    _assert_refused(path)
    assert not marker.exists()


def test_truncated_files_are_refused(valid_file: Path, tmp_path: Path) -> None:
    data = valid_file.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    for cut in (0, 3, 8, 20, 8 + header_len, len(data) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        _assert_refused(path)


def test_trailing_garbage_is_refused(valid_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(valid_file.read_bytes() + b"\x00junk")
    _assert_refused(path)


def test_flipped_data_byte_is_a_hash_mismatch(valid_file: Path, tmp_path: Path) -> None:
    data = bytearray(valid_file.read_bytes())
    data[-20] ^= 0x01
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(data))
    _assert_refused(path, "content hash mismatch: the file was altered or corrupted")
    # the lazy reader opens it (header is fine) but verify_hash catches it
    with open_weight_file(path) as reader:
        with pytest.raises(InputError, match="content hash mismatch"):
            reader.verify_hash()
    # reading without verification is possible on request
    read_weight_file(path, verify_hash=False)


def test_edited_metadata_is_a_hash_mismatch(valid_file: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(valid_file), framework="numpy") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    metadata["n_cases"] = "500"  # a site inflating its weight in the average
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    _assert_refused(path, "content hash mismatch")


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        (None, "no fedseg metadata"),
        ({"kind": '"update"'}, "missing"),
        ("drop:scopes", "missing 'scopes'"),
        ("set:round=not json", "not valid JSON"),
        ('set:round="1"', "'round' is invalid"),
        ("set:round=-1", "'round' is invalid"),
        ('set:kind="weights"', "'kind' is invalid"),
        ("set:format_version=99", "newer"),
        ('set:scopes={"w": 3}', "'scopes' is invalid"),
        ('set:scopes={"zzz": "global"}', "not in the file"),
    ],
)
def test_missing_or_invalid_metadata_is_refused(valid_file: Path, tmp_path: Path, metadata, fragment: str) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(valid_file), framework="numpy") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        good = dict(handle.metadata())
    if isinstance(metadata, str) and metadata.startswith("drop:"):
        metadata = {k: v for k, v in good.items() if k != metadata[5:]}
    elif isinstance(metadata, str) and metadata.startswith("set:"):
        key, value = metadata[4:].split("=", 1)
        metadata = {**good, key: value}
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(InputError) as info:
        read_weight_file(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_missing_file_and_folder_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_weight_file(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="folder"):
        read_weight_file(tmp_path)


# -- fuzzing: whatever the bytes, the reader answers with InputError or the right tensors -----
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fz") / "f.safetensors"
    path.write_bytes(data)
    with pytest.raises(InputError):
        read_weight_file(path)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=5) | st.sampled_from(["F32", "I64", "BOOL", "BF16"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "BF16", "X"]),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "data_offsets": st.lists(st.integers(-2, 80), min_size=0, max_size=3),
    }
)


@_FUZZ
@given(
    header=st.dictionaries(
        st.text(max_size=6),
        st.one_of(_entries, _json_values),
        max_size=4,
    ),
    meta=st.one_of(st.none(), st.dictionaries(st.sampled_from(["kind", "round", "scopes", "site", "x"]), _json_values)),
    body=st.binary(max_size=80),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 1000]),
)
def test_fuzz_random_headers(tmp_path_factory, header, meta, body: bytes, length_delta: int) -> None:
    if meta is not None:
        header = {**header, "__metadata__": meta}
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("fh") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + body)
    with pytest.raises(InputError):
        read_weight_file(path)


@_FUZZ
@given(position=st.integers(min_value=0), value=st.integers(0, 255), cut=st.booleans())
def test_fuzz_mutated_valid_file(tmp_path_factory, position: int, value: int, cut: bool) -> None:
    folder = tmp_path_factory.mktemp("fm")
    good = folder / "good.safetensors"
    write_weight_file(good, _tensors(), _meta())
    data = bytearray(good.read_bytes())
    position %= len(data)
    if cut:
        data = data[:position]
    else:
        data[position] = value
    path = folder / "bad.safetensors"
    path.write_bytes(bytes(data))
    try:
        tensors, meta = read_weight_file(path)
    except InputError:
        return
    # accepted only if nothing that matters changed (e.g. a padding space became another space)
    original = _tensors()
    assert set(tensors) == set(original)
    for name in original:
        np.testing.assert_array_equal(tensors[name], original[name])
    assert meta == read_weight_file(good)[1]

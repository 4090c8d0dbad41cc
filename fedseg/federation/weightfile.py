"""The weight file: safetensors tensors + fedseg metadata + a content hash. Never pickle.

A weight file from another site must never be able to run code, so fedseg reads nothing but
safetensors, and it checks the 8-byte length prefix and the JSON header itself (sizes, dtypes,
shapes, offsets, metadata) before the safetensors library sees the file. A pickle, a
`torch.save` zip, garbage or a truncated file is an `InputError`, never an unpickling.

Metadata (`__metadata__`, a str -> str map in safetensors) holds one JSON string per
`WeightMeta` field under the field's own name, so other tools can read single fields.
Files are written by fedseg's own streaming writer (byte-for-byte deterministic, see
`_save_safetensors`) and read as zero-copy views of a memory map after fedseg's own strict
header check (the safetensors library's reader copies every tensor; tests check that both
readers agree).

The content hash is a hash over a domain tag, the canonical JSON of every metadata field
except the hash itself, then for each tensor in sorted name order the canonical JSON of
[name, dtype, shape] and its raw little-endian bytes. It detects a flipped byte anywhere in
the tensors and any edit of the metadata (n_cases, round, scopes... decide how a file is
averaged, so they are covered too).

Which hash: the file's `format_version` says. Version 2 (written since) uses BLAKE3; version 1
used sha256 and is still read and verified as such, so old files and their signatures stay
valid. Measured on the development machine (x86-64 with SHA-NI, 128 MB of float32, one
thread): sha256 ~1.4 GB/s, BLAKE3 (the `blake3` package, AVX2) ~7.8 GB/s. The content hash is
what every reader checks on every byte, so its speed is the speed of validation; the sha256
of the file bytes (what `sha256sum` prints, recorded in round reports and signatures) is
computed beside it, off the critical path. Both release the GIL on large buffers, so files
are checked in threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import blake3
import numpy as np

import fedseg
from fedseg.atomic import atomic_path
from fedseg.bounds import (
    MAX_ROUND,
    MAX_SITE_CASES,
    MAX_SITE_ITERATIONS,
    MAX_TOTAL_COUNT,
    short,
    unbounded_number,
)
from fedseg.errors import InputError

WEIGHT_FORMAT_VERSION = 2        # what fedseg writes: BLAKE3 content hash
READABLE_FORMAT_VERSIONS = (1, 2)  # 1: sha256 content hash (files written before version 2)
KINDS = ("update", "model")

# safetensors dtype codes that numpy can represent, little-endian as the format prescribes.
_CODE_TO_NUMPY: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?",
}
_NUMPY_NAME_TO_CODE: dict[str, str] = {np.dtype(v).name: k for k, v in _CODE_TO_NUMPY.items()}

# Header limits, checked before the header is parsed: parsing JSON costs ~100 bytes of Python
# objects and ~0.2 µs per input byte, so a hostile 60 MB header with a million entries would
# take seconds and a gigabyte before any other check could refuse it. fedseg's largest
# networks have a few hundred tensors (~250 header bytes each with their scope), so 16 MiB
# and 65,536 entries leave a margin of more than 100x for real models while bounding the
# parse to a fraction of a second and tens of MB. (safetensors' own cap is 100 MB.)
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 65_536
# domain tag and hash constructor of the content hash, by format version
_CONTENT_HASH: dict[int, tuple[bytes, Callable[[bytes], Any]]] = {
    1: (b"fedseg-weights-v1\x00", hashlib.sha256),
    2: (b"fedseg-weights-v2\x00", blake3.blake3),
}
# bytes hashed per hashlib call when streaming a tensor: large enough that the call overhead
# vanishes, small enough that a pass over a mapped file keeps only this much of it resident
_HASH_CHUNK = 16 * 1024 * 1024
# What parsing a header can build, bounded before it is parsed. JSON's structural characters
# are never escaped, so counting them (a C-speed scan) bounds from above how many objects,
# lists, keys and values the parse would create. Per tensor entry a fedseg header holds one
# object, two lists (shape, data_offsets), three keys, and about ndim + 4 commas; its scope in
# `__metadata__` adds a ':' and a ','. The budgets below allow that for MAX_TENSORS entries of
# up to 12 dimensions, plus a slack for the other metadata (`extra` holds free-form metrics):
# a 16 MiB header of a few million empty lists or numbers, which would parse into ~400 MB of
# Python objects over seconds, is refused in milliseconds.
_HEADER_SLACK = 4096
_HEADER_BUDGET = {
    b"{": MAX_TENSORS + 1 + _HEADER_SLACK,
    b"[": 2 * MAX_TENSORS + _HEADER_SLACK,
    b":": 5 * MAX_TENSORS + _HEADER_SLACK,
    b",": 17 * MAX_TENSORS + _HEADER_SLACK,
}


@dataclass
class WeightMeta:
    """What a weight file says about itself (stored in safetensors `__metadata__`)."""

    kind: str                    # "update" (site -> coordinator) | "model" (coordinator -> site / pool model)
    plan_id: str
    strategy: str
    site: str                    # site name, or the pool name for a pool model ("global", "group:MRI")
    round: int                   # an update of round r is trained from the round r-1 model; 0 = initial
    n_cases: int
    n_iterations: int
    scopes: dict[str, str]       # tensor name -> pool; a tensor without an entry is local to the site
    format_version: int = WEIGHT_FORMAT_VERSION
    fedseg_version: str = fedseg.__version__
    content_hash: str = ""       # filled in by write_weight_file
    extra: dict[str, Any] = field(default_factory=dict)   # metrics etc. (val_dice, ...), JSON-able

    def to_metadata(self) -> dict[str, str]:
        return {name: json.dumps(value, sort_keys=True) for name, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, raw: Any, path: str | Path) -> WeightMeta:
        """Parse `__metadata__`; any missing, mistyped or undecodable field is an InputError."""
        if not isinstance(raw, dict) or not raw:
            raise InputError("weight file has no fedseg metadata (not written by fedseg?)", path)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                raise InputError(f"weight file metadata is missing {f.name!r}", path)
            text = raw[f.name]
            try:
                if not isinstance(text, str):
                    raise TypeError("metadata values are strings")
                values[f.name] = json.loads(text)
            except (ValueError, TypeError, RecursionError):
                raise InputError(f"weight file metadata field {f.name!r} is not valid JSON", path) from None
        _check_meta_types(values, path)
        return cls(**values)


def _check_meta_types(v: dict[str, Any], path: str | Path) -> None:
    def bad(name: str, what: str) -> InputError:
        return InputError(f"weight file metadata field {name!r} is invalid: {what}", path)

    def is_int(x: Any) -> bool:
        return type(x) is int

    if not is_int(v["format_version"]) or v["format_version"] not in READABLE_FORMAT_VERSIONS:
        if is_int(v["format_version"]) and v["format_version"] > WEIGHT_FORMAT_VERSION:
            raise bad("format_version", f"{v['format_version']} is newer than this fedseg reads ({WEIGHT_FORMAT_VERSION}); upgrade fedseg")
        raise bad("format_version", f"expected one of {READABLE_FORMAT_VERSIONS}, got {v['format_version']!r}")
    if v["kind"] not in KINDS:
        raise bad("kind", f"expected one of {', '.join(KINDS)}, got {v['kind']!r}")
    for name in ("plan_id", "strategy", "site", "fedseg_version", "content_hash"):
        if not isinstance(v[name], str):
            raise bad(name, "expected a string")
    for name, upper in _count_bounds(v["kind"]).items():
        if not is_int(v[name]) or not 0 <= v[name] <= upper:
            raise bad(name, f"expected an integer from 0 to {upper:,}, got {short(v[name])}")
    scopes = v["scopes"]
    if not isinstance(scopes, dict) or not all(isinstance(k, str) and isinstance(s, str) and s for k, s in scopes.items()):
        raise bad("scopes", "expected a map of tensor name -> pool name")
    if not isinstance(v["extra"], dict):
        raise bad("extra", "expected a JSON object")
    problem = unbounded_number(v["extra"])
    if problem is not None:
        raise bad("extra", problem)


def _count_bounds(kind: Any) -> dict[str, int]:
    """Upper bound of each count field (fedseg.bounds): an update is one site's round, a model
    may sum its sites' counts."""
    if kind == "update":
        return {"round": MAX_ROUND, "n_cases": MAX_SITE_CASES, "n_iterations": MAX_SITE_ITERATIONS}
    return {"round": MAX_ROUND, "n_cases": MAX_TOTAL_COUNT, "n_iterations": MAX_TOTAL_COUNT}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry, already checked against the file size."""

    name: str
    dtype: str                   # numpy dtype name ("float32", "int64", ...)
    shape: tuple[int, ...]
    begin: int                   # byte offsets into the data section
    end: int


def _not_weight_file(path: str | Path, reason: str) -> InputError:
    return InputError(f"not a safetensors weight file ({reason})", path)


def _sniff(prefix: bytes) -> str | None:
    """Name well-known non-safetensors formats, so the user learns what they handed in."""
    if prefix[:1] == b"\x80" or prefix[:2] in (b"(l", b"(d", b"}q", b"]q"):
        return "it looks like a Python pickle; fedseg never unpickles"
    if prefix[:4] == b"PK\x03\x04":
        return "it looks like a zip archive (torch.save?); fedseg reads safetensors only"
    if prefix[:6] == b"\x93NUMPY":
        return "it looks like a .npy file"
    return None


def parse_header(path: str | Path) -> tuple[dict[str, TensorInfo], Any, int]:
    """Check and parse the safetensors header without touching the data.

    Returns (tensor infos by name, raw `__metadata__` or None, byte offset of the data section).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _not_weight_file(path, f"only {len(prefix)} bytes long")
            n = int.from_bytes(prefix, "little")
            if n < 2 or n > MAX_HEADER_BYTES:
                # Sniff only an implausible header: a valid header length can start with any
                # byte (0x80 = a 0x..80-byte header is not the pickle opcode it resembles).
                raise _not_weight_file(path, _sniff(prefix) or f"header length {n} is implausible")
            if 8 + n > size:
                raise _not_weight_file(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = handle.read(n)
    except IsADirectoryError:
        raise InputError("is a folder, expected a .safetensors weight file", path) from None
    except FileNotFoundError:
        raise InputError("weight file not found", path) from None
    except PermissionError:
        raise InputError("weight file is not readable (permission denied)", path) from None
    if raw[:1] != b"{":
        raise _not_weight_file(path, "the header is not a JSON object")
    _check_header_budget(path, raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _not_weight_file(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_weight_file(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in metadata.items())
    ):
        raise _not_weight_file(path, "__metadata__ is not a map of strings")
    if len(header) > MAX_TENSORS:
        raise _not_weight_file(path, f"the header declares {len(header):,} tensors, more than {MAX_TENSORS:,}")
    data_start = 8 + n
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry)
    cursor = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != cursor:
            raise _not_weight_file(path, f"tensor {info.name!r} does not start where the previous one ends")
        cursor = info.end
    if cursor != data_size:
        what = "truncated" if cursor > data_size else "trailing bytes"
        raise _not_weight_file(path, f"tensor data is {cursor} bytes but the file holds {data_size} ({what})")
    return infos, metadata, data_start


def _check_header_budget(path: Path, raw: bytes) -> None:
    """Refuse, before parsing, a header with more JSON structure than MAX_TENSORS entries need."""
    for char, budget in _HEADER_BUDGET.items():
        count = raw.count(char)
        if count > budget:
            raise _not_weight_file(
                path, f"the header is too large for {MAX_TENSORS:,} tensor entries ({count:,} {char.decode()!r}, at most {budget:,})"
            )


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _not_weight_file(path, f"header entry {name!r} is malformed")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in _CODE_TO_NUMPY:
        raise _not_weight_file(path, f"tensor {name!r} has unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _not_weight_file(path, f"tensor {name!r} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise _not_weight_file(path, f"tensor {name!r} has invalid data offsets")
    begin, end = offsets
    dtype = np.dtype(_CODE_TO_NUMPY[code])
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise _not_weight_file(path, f"tensor {name!r}: data offsets do not match its shape and dtype")
    return TensorInfo(name, dtype.name, tuple(shape), begin, end)


class ContentHasher:
    """Incremental content hash (the algorithm of `meta.format_version`); feed tensors in
    sorted name order (checked)."""

    def __init__(self, meta: WeightMeta) -> None:
        domain, algorithm = _CONTENT_HASH[meta.format_version]
        self._h = algorithm(domain)
        body = asdict(meta)
        body.pop("content_hash")
        self._h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\x00")
        self._last: str | None = None

    def add(
        self, name: str, array: np.ndarray, after_chunk: Callable[[int, int], None] | None = None,
        chunk: int = _HASH_CHUNK,
    ) -> None:
        """Hash one tensor, in chunks of `chunk` bytes; `after_chunk(begin, end)` is told each
        byte range of the tensor once it is hashed (to release memory-mapped pages, or to do
        more work on the range while it is still in the CPU cache)."""
        if self._last is not None and name <= self._last:
            raise ValueError("tensors must be hashed in sorted name order")
        self._last = name
        desc = json.dumps([name, array.dtype.name, list(array.shape)], separators=(",", ":"))
        self._h.update(desc.encode("utf-8") + b"\x00")
        if not array.size:
            return
        flat = np.asarray(array, order="C").reshape(-1).view(np.uint8)
        for begin in range(0, flat.size, chunk):
            end = min(begin + chunk, flat.size)
            self._h.update(flat[begin:end])
            if after_chunk is not None:
                after_chunk(begin, end)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def compute_content_hash(tensors: Mapping[str, np.ndarray], meta: WeightMeta) -> str:
    hasher = ContentHasher(meta)
    for name in sorted(tensors):
        hasher.add(name, tensors[name])
    return hasher.hexdigest()


def to_numpy(value: Any) -> np.ndarray:
    """numpy array from a numpy array or a torch tensor (duck-typed: no torch import here)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def write_weight_file(path: str | Path, tensors: Mapping[str, Any], meta: WeightMeta) -> WeightMeta:
    """Write tensors + metadata atomically; returns the metadata with its content hash filled in."""
    return write_weight_file_digest(path, tensors, meta)[0]


def write_weight_file_digest(path: str | Path, tensors: Mapping[str, Any], meta: WeightMeta) -> tuple[WeightMeta, str]:
    """`write_weight_file`, also returning the sha256 of the file bytes (hashed while writing)."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        array = to_numpy(value)
        if array.dtype.name not in _NUMPY_NAME_TO_CODE:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in a weight file")
        # safetensors is little-endian and C-ordered; normalise so the hash sees what is stored
        arrays[name] = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    unknown = set(meta.scopes) - set(arrays)
    if unknown:
        raise ValueError(f"scopes name tensors that are not in the file: {sorted(unknown)[:5]}")
    if meta.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {meta.kind!r}")
    meta = replace(meta, content_hash="", format_version=WEIGHT_FORMAT_VERSION)
    meta = replace(meta, content_hash=compute_content_hash(arrays, meta))
    with atomic_path(path) as tmp:
        digest = _save_safetensors(tmp, arrays, meta.to_metadata())
    return meta, digest


def _save_safetensors(path: Path, arrays: Mapping[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write the safetensors format byte-for-byte deterministically, streaming tensor by tensor.

    `safetensors.numpy.save_file` serialises `__metadata__` from a Rust HashMap, so the same
    content gives different bytes (and sha256) on every write, and it builds the whole file in
    memory first. The format is small enough to write directly: u64 header length, JSON
    header (keys sorted, space-padded to 8 bytes), then the tensors back to back, largest
    itemsize first (as safetensors orders them) so every tensor is aligned to its itemsize.
    """
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": _NUMPY_NAME_TO_CODE[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    file_hash = hashlib.sha256()
    with open(path, "wb") as handle:
        for block in (len(raw).to_bytes(8, "little"), raw):
            handle.write(block)
            file_hash.update(block)
        for name in order:
            if arrays[name].size:
                block = arrays[name].reshape(-1).view(np.uint8).data
                handle.write(block)
                file_hash.update(block)
    return file_hash.hexdigest()


class WeightFileReader:
    """A checked, open weight file; tensors are zero-copy read-only views of the memory-mapped file.

    Only fedseg's own header check stands between the bytes and the views, and it proves
    every tensor's dtype, shape and byte range before any view is made; no code path
    deserialises objects.
    """

    def __init__(self, path: Path, infos: dict[str, TensorInfo], meta: WeightMeta, data_start: int) -> None:
        self.path = path
        self.infos = infos
        self.meta = meta
        self._data_start = data_start
        self._map: np.ndarray | None = None

    def map(self) -> np.ndarray:
        """Map the file now (tensors and file_sha256 then all read this one mapping)."""
        return self._mapped()

    def _mapped(self) -> np.ndarray:
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(f"weight file cannot be mapped: {exc}", self.path) from None
            expected = self._data_start + max((i.end for i in self.infos.values()), default=0)
            if self._map.size != expected:
                raise InputError("weight file changed size while being read", self.path)
        return self._map

    def close(self) -> None:
        # views handed out keep the mapping alive; dropping our reference is all that is needed
        self._map = None

    def keys(self) -> list[str]:
        return sorted(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor as a read-only array backed by the memory-mapped file (no copy)."""
        info = self.infos.get(name)
        if info is None:
            raise KeyError(name)
        start = self._data_start + info.begin
        raw = self._mapped()[start:self._data_start + info.end]
        array = raw.view(np.ndarray).view(np.dtype(_CODE_TO_NUMPY[_NUMPY_NAME_TO_CODE[info.dtype]]))
        array = array.reshape(info.shape)
        array.flags.writeable = False
        return array

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.keys():
            yield name, self.get_tensor(name)

    def file_sha256(self) -> str:
        """sha256 of the whole file (what `sha256sum` prints), hashed straight from the mapping."""
        return hashlib.sha256(self._mapped()).hexdigest()

    def verify_hash(self) -> None:
        """Check the content hash, streaming over the mapping tensor by tensor.

        Pages already hashed are handed back to the kernel as the pass goes (they are file
        pages: a later read maps them again from the page cache), so checking a file keeps
        resident memory at one chunk, whatever the file declares.
        """
        hasher = ContentHasher(self.meta)
        for name in self.keys():
            offset = self._data_start + self.infos[name].begin
            hasher.add(name, self.get_tensor(name), lambda b, e, o=offset: self._release(o + b, o + e))
        check_hash(self.path, self.meta, hasher.hexdigest())

    def _release(self, begin: int, end: int) -> None:
        """madvise(DONTNEED) the mapped file bytes [begin, end): drops them from this process's
        resident set; the mapping stays valid (a later read faults them in again)."""
        # np.memmap keeps its mmap.mmap object as `_mmap` (the only handle that can madvise)
        handle = getattr(self._mapped(), "_mmap", None)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        start = begin - begin % mmap.PAGESIZE
        if handle is None or advice is None or end <= start:
            return
        with contextlib.suppress(OSError, ValueError):
            handle.madvise(advice, start, end - start)


def check_hash(path: str | Path, meta: WeightMeta, actual: str) -> None:
    if actual != meta.content_hash:
        raise InputError("content hash mismatch: the file was altered or corrupted", path)


@contextlib.contextmanager
def open_weight_file(path: str | Path) -> Iterator[WeightFileReader]:
    """Open a weight file lazily: header and metadata are checked now, tensors read on demand.

    The content hash is NOT checked here (that needs a pass over all data); call
    `reader.verify_hash()` or use `read_weight_file`, or check it while streaming as
    `fedseg.federation.validation` does.
    """
    reader = open_reader(path)
    try:
        yield reader
    finally:
        reader.close()


def open_reader(path: str | Path) -> WeightFileReader:
    """`open_weight_file` without the context manager (closing only drops the mapping)."""
    path = Path(path)
    infos, raw_meta, data_start = parse_header(path)
    meta = WeightMeta.from_metadata(raw_meta, path)
    unknown = set(meta.scopes) - set(infos)
    if unknown:
        raise InputError(f"metadata scopes name tensors that are not in the file: {', '.join(sorted(unknown)[:5])}", path)
    return WeightFileReader(path, infos, meta, data_start)


def check_declared_tensors(
    reader: WeightFileReader, allowed: Mapping[str, tuple[tuple[int, ...], str]], owner: str
) -> None:
    """Refuse, from the header alone, a tensor that is not in `allowed` ({name: (shape, dtype)})
    or that has another shape or dtype; `owner` says whose parameters `allowed` lists.

    Run before any tensor byte is read: a file that declares a stowaway tensor (of any size)
    is refused without touching it, so what is hashed and copied afterwards is bounded by the
    plan's manifest, i.e. by one model.
    """
    unknown = set(reader.infos) - set(allowed)
    if unknown:
        raise InputError(f"holds {len(unknown)} tensor(s) that are not parameters of {owner}: {describe(unknown)}", reader.path)
    for name, info in sorted(reader.infos.items()):
        shape, dtype = allowed[name]
        if info.shape != tuple(shape) or info.dtype != dtype:
            raise InputError(
                f"tensor {name!r} is {info.dtype}{list(info.shape)}, the plan expects {dtype}{list(shape)}", reader.path
            )


def read_weight_file(path: str | Path, *, verify_hash: bool = True) -> tuple[dict[str, np.ndarray], WeightMeta]:
    """Load every tensor (as writable copies) and the metadata; InputError on any fault.

    Copies whatever the file declares: for a file from another site, check its header
    against the plan first (`open_reader` + `check_declared_tensors`, as `compose_site_state`
    and the update validation do). The hash is checked on the mapping before anything is copied.
    """
    with open_weight_file(path) as reader:
        if verify_hash:
            reader.verify_hash()
        tensors = {name: np.array(array) for name, array in reader.iter_tensors()}
        meta = reader.meta
    return tensors, meta


def numpy_dtype_supported(name: str) -> bool:
    return name in _NUMPY_NAME_TO_CODE


def sha256_file(path: str | Path) -> str:
    """sha256 of the file bytes (what `sha256sum` prints), hashed from a memory map (no copies)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return hashlib.sha256().hexdigest()
    return hashlib.sha256(np.memmap(path, dtype=np.uint8, mode="r")).hexdigest()


def describe(names: Iterable[str], limit: int = 5) -> str:
    """'a, b, c (+4 more)' for error messages that would otherwise list hundreds of names."""
    items = sorted(names)
    text = ", ".join(items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

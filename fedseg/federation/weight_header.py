"""The weight file's header: fedseg's own check of the safetensors header and its metadata.

A weight file from another site must never be able to run code, so fedseg checks the 8-byte
length prefix and the JSON header itself (sizes, dtypes, shapes, offsets, metadata) before
any tensor byte is read. A pickle, a `torch.save` zip, garbage or a truncated file is an
`InputError`, never an unpickling.

Metadata (`__metadata__`, a str -> str map in safetensors) holds one JSON string per
`WeightMeta` field under the field's own name, so other tools can read single fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

import fedseg
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


def numpy_dtype_supported(name: str) -> bool:
    """Whether a tensor of numpy dtype `name` can be stored in a weight file."""
    return name in _NUMPY_NAME_TO_CODE


def stored_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype in which a tensor of numpy dtype `name` is stored."""
    return np.dtype(_CODE_TO_NUMPY[_NUMPY_NAME_TO_CODE[name]])


def dtype_code(name: str) -> str:
    """The safetensors dtype code ("F32", "I64", ...) of numpy dtype `name`."""
    return _NUMPY_NAME_TO_CODE[name]

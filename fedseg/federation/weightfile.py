"""The weight file: safetensors tensors + fedseg metadata + a content hash. Never pickle.

A weight file from another site must never be able to run code, so fedseg reads nothing but
safetensors, after its own strict check of the header (fedseg.federation.weight_header).
Files are written by fedseg's own streaming writer (byte-for-byte deterministic, see
`_save_safetensors`) and read as zero-copy views of a memory map after that header check (the
safetensors library's reader copies every tensor; tests check that both readers agree). Every
reader can verify the content hash (fedseg.federation.content_hash) over the mapping.

The header's and the hash's public names are importable from here too: this is the module
the rest of fedseg reads and writes weight files through.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.atomic import atomic_path
from fedseg.errors import InputError
from fedseg.federation.content_hash import ContentHasher, check_hash, compute_content_hash
from fedseg.federation.weight_header import (
    KINDS,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    READABLE_FORMAT_VERSIONS,
    WEIGHT_FORMAT_VERSION,
    TensorInfo,
    WeightMeta,
    dtype_code,
    numpy_dtype_supported,
    parse_header,
    stored_dtype,
)

__all__ = [
    "KINDS", "MAX_HEADER_BYTES", "MAX_TENSORS", "READABLE_FORMAT_VERSIONS", "WEIGHT_FORMAT_VERSION",
    "ContentHasher", "TensorInfo", "WeightFileReader", "WeightMeta",
    "check_declared_tensors", "check_hash", "compute_content_hash", "describe", "numpy_dtype_supported",
    "open_reader", "open_weight_file", "parse_header", "read_weight_file", "sha256_file", "to_numpy",
    "write_weight_file", "write_weight_file_digest",
]


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
        if not numpy_dtype_supported(array.dtype.name):
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
    # the sha256 of the bytes, in a thread (hashlib and file writes release the GIL), while
    # this one writes them and waits for the disk (fsync)
    with ThreadPoolExecutor(max_workers=1) as hashing:
        with atomic_path(path) as tmp:
            digest = _save_safetensors(tmp, arrays, meta.to_metadata(), hashing)
        return meta, digest.result()


def _save_safetensors(
    path: Path, arrays: Mapping[str, np.ndarray], metadata: dict[str, str], hashing: ThreadPoolExecutor | None = None,
) -> Future[str]:
    """Write the safetensors format byte-for-byte deterministically, streaming tensor by tensor.

    `safetensors.numpy.save_file` serialises `__metadata__` from a Rust HashMap, so the same
    content gives different bytes (and sha256) on every write, and it builds the whole file in
    memory first. The format is small enough to write directly: u64 header length, JSON
    header (keys sorted, space-padded to 8 bytes), then the tensors back to back, largest
    itemsize first (as safetensors orders them) so every tensor is aligned to its itemsize.
    The sha256 of the file bytes is hashed from the same buffers (not read back), by `hashing`
    when given (the future is done once the file is written otherwise).
    """
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": dtype_code(array.dtype.name),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    blocks = [len(raw).to_bytes(8, "little"), raw]
    blocks += [arrays[name].reshape(-1).view(np.uint8).data for name in order if arrays[name].size]
    if hashing is not None:
        digest = hashing.submit(_sha256_of, blocks)
    with open(path, "wb") as handle:
        for block in blocks:
            handle.write(block)
    if hashing is None:
        digest = Future()
        digest.set_result(_sha256_of(blocks))
    return digest


def _sha256_of(blocks: list[Any]) -> str:
    file_hash = hashlib.sha256()
    for block in blocks:
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
        array = raw.view(np.ndarray).view(stored_dtype(info.dtype))
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

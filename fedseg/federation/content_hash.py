"""The content hash of a weight file.

The content hash is a hash over a domain tag, the canonical JSON of every metadata field
except the hash itself, then for each tensor in sorted name order the canonical JSON of
[name, dtype, shape] and its raw little-endian bytes. It detects a flipped byte anywhere in
the tensors and any edit of the metadata (n_cases, round, scopes... decide how a file is
averaged, so they are covered too).

Which hash: the file's `format_version` says. Version 2 (written since) uses BLAKE3; version 1
used sha256 and is still read and verified as such, so old files and their signatures stay
valid. Measured on the development machine (x86-64 with SHA-NI, 128 MB of float32, one
thread): sha256 ~1.4 GB/s, BLAKE3 (the `blake3` package, AVX2) ~7.8 GB/s. The content hash is
what every reader checks on every byte, so its speed is the speed of validation, and it is
what a round report names a version-2 input by, so the coordinator hashes its bytes once. The
sha256 of the file bytes (what `sha256sum` prints) is computed by writers while writing (round
outputs, signatures) and by validation for version-1 inputs only. Both release the GIL on
large buffers, so files are checked in threads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from fedseg.errors import InputError
from fedseg.federation.weight_header import WeightMeta

# domain tag and hash constructor of the content hash, by format version
_CONTENT_HASH: dict[int, tuple[bytes, Callable[[bytes], Any]]] = {
    1: (b"fedseg-weights-v1\x00", hashlib.sha256),
    2: (b"fedseg-weights-v2\x00", blake3.blake3),
}
# bytes hashed per hashlib call when streaming a tensor: large enough that the call overhead
# vanishes, small enough that a pass over a mapped file keeps only this much of it resident
_HASH_CHUNK = 16 * 1024 * 1024


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


def check_hash(path: str | Path, meta: WeightMeta, actual: str) -> None:
    """InputError naming `path` when `actual` is not the content hash its metadata records."""
    if actual != meta.content_hash:
        raise InputError("content hash mismatch: the file was altered or corrupted", path)

"""The data pass of update validation: content hash, finite values and L2 norm in one read.

Each file's tensors are read a cache-sized chunk at a time: the chunk is hashed, then checked
for finite values and summed into the norm while it is in the CPU cache, so the pass reads
the data from memory once. A file's pass is a generator (`scan_steps`) that checks one tensor
per step, in the sorted name order its content hash needs; two drivers run it:

- `scan_file`: one file to the end (files in parallel threads: `fedseg validate`);
- `scan_together`: every file of a round in one thread, a tensor at a time in name order
  across the files, which is the order the engine merges them in (key by key): while the
  engine merges a key, the pass is checking the same key's tensors, so what one of them
  read from memory the other finds in the CPU's last-level cache.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.weightfile import ContentHasher, WeightFileReader, check_hash

# Bytes per chunk of the pass: hashed, then summed while still in L2/L3 cache.
SCAN_CHUNK = 1 << 20
# Elements per block in the finite/norm pass: 64 Ki float32 (256 KiB) stays in L2 and keeps
# float32 dot-product rounding small (measured relative error ~1e-8 against float64); the
# sum over blocks is float64.
_BLOCK = 1 << 16

ScanSteps = Generator[str, None, float]   # yields the name of the tensor it checks next; returns the norm


def sum_of_squares(name: str, array: np.ndarray, path: Path) -> float:
    """Σ x² of a float tensor in float64 over float32 dot products of cache-sized blocks.

    NaN or inf make a block's dot product non-finite, so the same pass is the finite check.
    A float32 dot can also overflow for huge finite values: such a block is looked at again
    (non-finite values -> InputError, otherwise summed in float64).
    """
    flat = array.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK]
        if block.dtype.itemsize < 4:  # float16: square and sum in float32 (f16 would overflow)
            block = block.astype(np.float32)
        part = float(np.dot(block, block))
        if not math.isfinite(part):
            bad = int(np.count_nonzero(~np.isfinite(block)))
            if bad:
                raise InputError(f"tensor {name!r} holds {bad} non-finite value(s) (NaN or inf)", path)
            wide = block.astype(np.float64)
            part = float(np.dot(wide, wide))
        total += part
    return total


def _tensor_sumsq(hasher: ContentHasher | None, name: str, array: np.ndarray, path: Path) -> float:
    """Hash one tensor (when `hasher`) and return its Σ x² (0 for integer tensors)."""
    is_float = np.issubdtype(array.dtype, np.floating)
    if hasher is None:
        return sum_of_squares(name, array, path) if is_float else 0.0
    flat = array.reshape(-1)
    itemsize = array.dtype.itemsize
    parts: list[float] = []

    def summed(begin: int, end: int) -> None:
        # byte range -> element range; chunks are multiples of every itemsize
        parts.append(sum_of_squares(name, flat[begin // itemsize:end // itemsize], path))

    hasher.add(name, array, summed if is_float else None, chunk=SCAN_CHUNK)
    return math.fsum(parts)


def scan_steps(reader: WeightFileReader, max_norm: float | None, content_hash: bool = True, signed: bool = False) -> ScanSteps:
    """The pass over one file, a tensor per step: content hash (unless `content_hash` is
    False), finite check and L2 norm; returns the norm. InputError on the first fault."""
    path = reader.path
    hasher = ContentHasher(reader.meta) if content_hash else None
    sumsq = 0.0
    for name in reader.keys():
        yield name
        sumsq += _tensor_sumsq(hasher, name, reader.get_tensor(name), path)
    if hasher is not None:
        if signed and hasher.hexdigest() != reader.meta.content_hash:
            raise InputError("bad signature: the file bytes differ from the signed ones (content hash mismatch)", path)
        check_hash(path, reader.meta, hasher.hexdigest())
    norm = math.sqrt(sumsq)
    if max_norm is not None and not norm <= max_norm:
        raise InputError(f"update L2 norm {norm:.6g} exceeds the plan's bound max_update_norm={max_norm:g}", path)
    return norm


def scan_file(steps: ScanSteps) -> float:
    """Run one file's pass to the end; returns its norm."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def scan_together(steps: Sequence[ScanSteps], results: Sequence[Future[float]], stop: threading.Event) -> None:
    """Run every file's pass, always the file whose next tensor comes first by name; each
    file's norm or fault goes to its future as soon as it is known (a fault ends that file's
    pass, not the others': the caller reports the first bad file in its own order). `stop`:
    give up (the futures not yet done stay pending)."""
    queue: list[tuple[str, int]] = []

    def advance(index: int) -> None:
        try:
            name = next(steps[index])
        except StopIteration as done:
            results[index].set_result(done.value)
        except Exception as exc:  # noqa: BLE001 - the file's own fault, reported by its future
            results[index].set_exception(exc)
        else:
            heapq.heappush(queue, (name, index))

    for index in range(len(steps)):
        advance(index)
    while queue and not stop.is_set():
        advance(heapq.heappop(queue)[1])

"""Check a round's update files before any arithmetic (ARCHITECTURE.md §6).

Cheap checks first (header, metadata, names/shapes/dtypes/scopes against the plan, rounds,
duplicates, signatures when the plan lists keys), so a wrong file is refused in milliseconds;
then one streaming pass per file over the tensor data that verifies the content hash, that
every value is finite and the update's L2 norm, a cache-sized chunk at a time (each chunk is
hashed and summed while it is in the CPU cache, so the data is read from memory once). Files
are checked in threads: the hashes and numpy release the GIL on large buffers.

Which check proves integrity depends on the format version (fedseg.federation.weightfile):
a version-2 file's content hash is BLAKE3 (~5x faster than sha256) and is always verified in
the pass; it is also what a signature signs and what the round record names the file by
(`InputRecord.content_hash`), so every byte of a version-2 file is read and hashed once. A
version-1 file's content hash is sha256; a signed version-1 file is hashed once, by the sha256
of its bytes compared with the signed one in the pass (its signature covers the content hash
too), an unsigned one by its content hash, and the sha256 of its bytes, which the round
record still names it by, is computed in a background thread while the caller merges
(`ValidatedUpdate.sha256` waits for it).

Every failure is an InputError naming the file and the fault; the first bad file in the
order given is reported.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.privacy_params import parse_privacy
from fedseg.federation.secure_aggregation import WIRE_DTYPE
from fedseg.federation.signing import Signature, verify_signature
from fedseg.federation.routes import RouteTable, route_table
from fedseg.federation.weightfile import (
    ContentHasher,
    WeightFileReader,
    WeightMeta,
    check_hash,
    describe,
    open_reader,
)
from fedseg.names import check_site_name

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

# Bytes per chunk of the validation pass: hashed, then summed while still in L2/L3 cache.
_SCAN_CHUNK = 1 << 20
# Elements per block in the finite/norm pass: 64 Ki float32 (256 KiB) stays in L2 and keeps
# float32 dot-product rounding small (measured relative error ~1e-8 against float64); the
# sum over blocks is float64.
_BLOCK = 1 << 16


@dataclass
class ValidatedUpdate:
    path: Path
    meta: WeightMeta
    n_bytes: int
    update_norm: float     # L2 norm over all tensors in the file, in float64
    # The open mapping that was validated: the engine reads tensors from it, so a file
    # replaced after validation cannot slip unchecked bytes into the average.
    reader: WeightFileReader = field(repr=False, compare=False)
    # sha256 of the bytes of a version-1 file, computed in the background (see `sha256`);
    # None for version 2, whose verified content hash identifies it
    pending_sha256: Future[str] | None = field(repr=False, compare=False, default=None)
    signed_sha256: str | None = field(repr=False, compare=False, default=None)

    @property
    def site(self) -> str:
        return self.meta.site

    @property
    def content_hash(self) -> str:
        """The file's content hash, verified against its data (or, for a signed version-1 file,
        signed for bytes that were checked to be the signed ones)."""
        return self.meta.content_hash

    @property
    def sha256(self) -> str | None:
        """sha256 of the bytes of a version-1 file (waits for the background hash); None for a
        version-2 file, which is not hashed twice. InputError when the file is signed and its
        bytes are not the signed ones."""
        if self.pending_sha256 is None:
            return None
        digest = self.pending_sha256.result()
        if self.signed_sha256 is not None and digest != self.signed_sha256:
            raise InputError("bad signature: the file bytes differ from the signed ones (sha256 mismatch)", self.path)
        return digest

    def bytes_sha256(self) -> str:
        """sha256 of the file bytes whatever its version: hashed now for a version-2 file, only
        to compare it with a round record written before inputs were named by content hash."""
        return self.sha256 or self.reader.file_sha256()


def expected_update(
    plans: Plans, site: str, table: RouteTable | None = None
) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """{name: (shape, dtype, pool)} of what `site` must send: its tensors the route table sends
    (`table`: the plan's, when the caller has read it already)."""
    sent = (table or route_table(plans)).sent(site)
    return {name: (shape, dtype, sent[name].pool)
            for name, (shape, dtype) in expected_parameters(plans, site).items() if name in sent}


def wire_dtype(plans: Plans, dtype: str) -> str:
    """The dtype an update carries for a tensor of `dtype`: ring words under secure aggregation."""
    return WIRE_DTYPE if parse_privacy(plans.strategy.params).secure_aggregation else dtype


def _check_structure(
    reader: WeightFileReader, plans: Plans, expected_round: int | None, plan_id: str,
    table: Callable[[], RouteTable],
) -> WeightMeta:
    path, meta, infos = reader.path, reader.meta, reader.infos
    if meta.kind != "update":
        raise InputError(f"is a {meta.kind!r} file, expected an update (round_r/updates/<site>.safetensors)", path)
    if meta.plan_id != plan_id:
        raise InputError(
            f"was made under another plan (plan_id {meta.plan_id[:12]}…, this plan {plan_id[:12]}…)", path
        )
    if meta.strategy != plans.strategy.name:
        raise InputError(f"was made for strategy {meta.strategy!r}, the plan uses {plans.strategy.name!r}", path)
    check_site_name(meta.site, path)
    if meta.site not in plans.sites:
        raise InputError(f"comes from site {meta.site!r}, which is not in the plan (sites: {describe(plans.sites)})", path)
    if meta.round < 1:
        raise InputError(f"has round {meta.round}; updates start at round 1 (round 0 is the initial model)", path)
    if expected_round is not None and meta.round != expected_round:
        raise InputError(f"is an update of round {meta.round}, expected round {expected_round}", path)
    if meta.n_cases < 1:
        raise InputError("has n_cases 0; an update must come from at least one training case", path)
    expected = expected_update(plans, meta.site, table())
    missing = set(expected) - set(infos)
    if missing:
        raise InputError(f"is missing {len(missing)} tensor(s) site {meta.site!r} must send: {describe(missing)}", path)
    extra = set(infos) - set(expected)
    if extra:
        raise InputError(
            f"holds {len(extra)} tensor(s) that site {meta.site!r} must not send (unknown or local-only): {describe(extra)}",
            path,
        )
    for name, (shape, dtype, _pool) in expected.items():
        info = infos[name]
        dtype = wire_dtype(plans, dtype)
        if info.shape != shape:
            raise InputError(f"tensor {name!r} has shape {list(info.shape)}, the plan expects {list(shape)}", path)
        if info.dtype != dtype:
            raise InputError(f"tensor {name!r} has dtype {info.dtype}, the plan expects {dtype}", path)
    want_scopes = {name: pool for name, (_s, _d, pool) in expected.items()}
    if meta.scopes != want_scopes:
        wrong = sorted(n for n in set(want_scopes) | set(meta.scopes) if meta.scopes.get(n) != want_scopes.get(n))
        first = wrong[0]
        raise InputError(
            f"scope of {first!r} is {meta.scopes.get(first)!r}, the plan routes it to {want_scopes.get(first)!r}"
            f" ({len(wrong)} scope(s) differ)",
            path,
        )
    return meta


def _sum_of_squares(name: str, array: np.ndarray, path: Path) -> float:
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


def _scan_data(reader: WeightFileReader, max_norm: float | None, content_hash: bool = True, signed: bool = False) -> float:
    """Content hash (unless `content_hash` is False) + finite check + L2 norm in one pass over
    the tensors, a cache-sized chunk at a time; returns the norm."""
    path = reader.path
    hasher = ContentHasher(reader.meta) if content_hash else None
    sumsq = 0.0
    for name, array in reader.iter_tensors():
        is_float = np.issubdtype(array.dtype, np.floating)
        if hasher is None:
            if is_float:
                sumsq += _sum_of_squares(name, array, path)
            continue
        flat = array.reshape(-1)
        itemsize = array.dtype.itemsize
        parts: list[float] = []

        def summed(begin: int, end: int, flat: np.ndarray = flat, name: str = name) -> None:
            # byte range -> element range; chunks are multiples of every itemsize
            parts.append(_sum_of_squares(name, flat[begin // itemsize:end // itemsize], path))

        hasher.add(name, array, summed if is_float else None, chunk=_SCAN_CHUNK)
        sumsq += math.fsum(parts)
    if hasher is not None:
        if signed and hasher.hexdigest() != reader.meta.content_hash:
            raise InputError("bad signature: the file bytes differ from the signed ones (content hash mismatch)", path)
        check_hash(path, reader.meta, hasher.hexdigest())
    norm = math.sqrt(sumsq)
    if max_norm is not None and not norm <= max_norm:
        raise InputError(f"update L2 norm {norm:.6g} exceeds the plan's bound max_update_norm={max_norm:g}", path)
    return norm


def validate_updates(
    plans: Plans,
    update_paths: Sequence[str | Path],
    expected_round: int | None = None,
    workers: int | None = None,
    plan_id: str | None = None,
) -> list[ValidatedUpdate]:
    """Validate a round's updates; returns them in the order given. InputError on the first fault.

    `plan_id`: `plans.plan_id` when the caller has it (a hash of the whole plan)."""
    paths = [Path(p) for p in update_paths]
    if not paths:
        raise InputError("no update files given")
    readers = [open_reader(p) for p in paths]
    plan_id = plan_id or plans.plan_id   # a hash of the whole plan: computed once, not per file
    # the route table: read once, not per file, and only once a file was made under this plan
    table = functools.cache(lambda: route_table(plans))
    metas = [_check_structure(r, plans, expected_round, plan_id, table) for r in readers]

    first_round = metas[0].round
    seen: dict[str, Path] = {}
    for path, meta in zip(paths, metas):
        if meta.round != first_round:
            raise InputError(f"is an update of round {meta.round}, but {paths[0]} is of round {first_round}", path)
        if meta.site in seen:
            raise InputError(f"is a second update from site {meta.site!r} (first: {seen[meta.site]})", path)
        seen[meta.site] = path

    # Signatures (when the plan lists keys) before reading any data: an unsigned or foreign
    # file is refused in microseconds. They sign the content hash, which the pass below checks.
    signatures = [
        verify_signature(plans.keys, r.path, m.content_hash, m.site) if plans.keys else None
        for r, m in zip(readers, metas)
    ]

    bound = plans.strategy.params.get("max_update_norm")
    return _scan_all(readers, metas, signatures, float(bound) if bound is not None else None, workers)


def _scan_all(
    readers: list[WeightFileReader], metas: list[WeightMeta], signatures: list[Signature | None], max_norm: float | None,
    workers: int | None,
) -> list[ValidatedUpdate]:
    """The data pass of every file, in threads; for version-1 files the sha256 of their bytes
    queued behind it."""
    # Integrity first, in the pass: the content hash, except for a signed version-1 file, whose
    # (sha256) content hash would cost as much as the sha256 of its bytes that its signature
    # needs anyway: that one is checked in the pass instead.
    old = [m.format_version < 2 for m in metas]
    by_bytes = [sig is not None and v1 for sig, v1 in zip(signatures, old)]
    n_workers = max(1, min(len(readers), workers or os.cpu_count() or 1))
    for reader in readers:
        reader.map()  # before the threads: the pass and the sha256 share one mapping
    pool = ThreadPoolExecutor(max_workers=n_workers)
    try:
        scans = [
            pool.submit(_scan_data, r, max_norm, not bytes_only, sig is not None)
            for r, sig, bytes_only in zip(readers, signatures, by_bytes)
        ]
        # queued behind the scans: they run while the caller merges
        digests = [pool.submit(r.file_sha256) if v1 else None for r, v1 in zip(readers, old)]
        updates = []
        # report the first bad file in the order given, whatever finished first
        for r, m, scan, digest, sig, bytes_only in zip(readers, metas, scans, digests, signatures, by_bytes):
            update = ValidatedUpdate(
                path=r.path, meta=m, n_bytes=int(r.map().size), update_norm=0.0, reader=r,
                pending_sha256=digest, signed_sha256=sig.sha256 if sig is not None and digest is not None else None,
            )
            if bytes_only:
                update.sha256  # noqa: B018 - the integrity check of this file: before its data counts
            update.update_norm = scan.result()
            updates.append(update)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=False)   # the sha256 tasks finish on their own; `.sha256` waits for one
    return updates

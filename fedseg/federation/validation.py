"""Check a round's update files before anything of them is written (ARCHITECTURE.md §6).

Cheap checks first (header, metadata, names/shapes/dtypes/scopes against the plan, rounds,
duplicates, signatures when the plan lists keys), so a wrong file is refused in milliseconds;
then one streaming pass per file over the tensor data that verifies the content hash, that
every value is finite and the update's L2 norm (fedseg.federation.data_pass). Files are
checked in threads (the hashes and numpy release the GIL on large buffers), or, for the
engine, in one thread through all files in the order it merges them, while it merges
(`start_validation`).

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
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedseg.errors import InputError
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.privacy_params import parse_privacy
from fedseg.federation.secure_aggregation import WIRE_DTYPE
from fedseg.federation.data_pass import scan_file, scan_steps, scan_together
from fedseg.federation.routes import RouteTable, route_table
from fedseg.federation.signing import Signature, verify_signature
from fedseg.federation.weightfile import WeightFileReader, WeightMeta, describe, open_reader
from fedseg.names import check_site_name

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


@dataclass
class ValidatedUpdate:
    path: Path
    meta: WeightMeta
    n_bytes: int
    update_norm: float     # L2 norm over all tensors in the file, in float64 (NaN until the data pass ends)
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


def validate_updates(
    plans: Plans,
    update_paths: Sequence[str | Path],
    expected_round: int | None = None,
    workers: int | None = None,
    plan_id: str | None = None,
) -> list[ValidatedUpdate]:
    """Validate a round's updates; returns them in the order given. InputError on the first fault.

    `plan_id`: `plans.plan_id` when the caller has it (a hash of the whole plan)."""
    return start_validation(plans, update_paths, expected_round, workers, plan_id).wait()


def start_validation(
    plans: Plans,
    update_paths: Sequence[str | Path],
    expected_round: int | None = None,
    workers: int | None = None,
    plan_id: str | None = None,
) -> PendingValidation:
    """The cheap checks of every file now (InputError on the first fault), the data pass
    started in `workers` threads (default: one per core, a file each; 1: one thread through
    every file, tensor by tensor in name order, as the engine merges them): `.wait()` for its
    verdict. Until then the updates' data is unchecked: a caller may compute from it but must
    not let anything of it out."""
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
    return _start_scans(readers, metas, signatures, float(bound) if bound is not None else None, workers)


@dataclass
class PendingValidation:
    """Updates whose header, metadata, structure and signatures passed, with the data pass of
    every file (integrity, finite values, norm) running in threads."""

    updates: list[ValidatedUpdate]
    scans: list[Future[float]] = field(repr=False)
    by_bytes: list[bool] = field(repr=False)      # integrity by the sha256 of the bytes (signed version 1)
    pool: ThreadPoolExecutor = field(repr=False)
    stop: threading.Event = field(repr=False, default_factory=threading.Event)
    verdict: BaseException | None = field(repr=False, default=None)
    checked: bool = False

    def wait(self) -> list[ValidatedUpdate]:
        """The updates once every file passed (norms filled in); InputError for the first bad
        file in the order given, whatever finished first (the same on every call)."""
        if self.verdict is not None:
            raise self.verdict
        if self.checked:
            return self.updates
        try:
            for update, scan, bytes_only in zip(self.updates, self.scans, self.by_bytes):
                if bytes_only:
                    update.sha256  # noqa: B018 - the integrity check of this file: before its data counts
                update.update_norm = scan.result()
        except BaseException as exc:
            self.verdict = exc
            self.stop.set()
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.pool.shutdown(wait=False)   # the sha256 tasks finish on their own; `.sha256` waits for one
        self.checked = True
        return self.updates


def _start_scans(
    readers: list[WeightFileReader], metas: list[WeightMeta], signatures: list[Signature | None], max_norm: float | None,
    workers: int | None,
) -> PendingValidation:
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
    steps = [scan_steps(r, max_norm, not bytes_only, sig is not None)
             for r, sig, bytes_only in zip(readers, signatures, by_bytes)]
    stop = threading.Event()
    if n_workers == 1:   # one thread through every file, in the order the engine merges them
        scans: list[Future[float]] = [Future() for _ in steps]
        pool.submit(scan_together, steps, scans, stop)
    else:
        scans = [pool.submit(scan_file, s) for s in steps]
    # queued behind the scans: they run while the caller merges
    digests = [pool.submit(r.file_sha256) if v1 else None for r, v1 in zip(readers, old)]
    updates = [
        ValidatedUpdate(
            path=r.path, meta=m, n_bytes=int(r.map().size), update_norm=math.nan, reader=r,
            pending_sha256=digest, signed_sha256=sig.sha256 if sig is not None and digest is not None else None,
        )
        for r, m, digest, sig in zip(readers, metas, digests, signatures)
    ]
    return PendingValidation(updates, scans, by_bytes, pool, stop)

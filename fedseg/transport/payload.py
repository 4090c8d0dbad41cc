"""A weight file and its detached signature as bytes, and back: what one message carries.

The bytes are the file exactly as `write_site_update` / `aggregate_round` wrote it, so the
receiver checks them with the same code as a file that arrived by any other route
(content hash, plan, round, signature).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedseg.atomic import write_bytes_atomic
from fedseg.errors import InputError
from fedseg.federation.signing import signature_path

WEIGHTS = "weights.safetensors"
SIGNATURE = "weights.safetensors.sig"


def read_weight_bundle(path: str | Path) -> dict[str, bytes]:
    """{WEIGHTS: file bytes, SIGNATURE: .sig bytes (only when the file has one)}."""
    path = Path(path)
    if not path.is_file():
        raise InputError("weight file not found", path)
    bundle = {WEIGHTS: path.read_bytes()}
    sig = signature_path(path)
    if sig.is_file():
        bundle[SIGNATURE] = sig.read_bytes()
    return bundle


def write_weight_bundle(bundle: Mapping[str, bytes], path: str | Path, sender: str) -> Path:
    """Write a received bundle as `path` (+ `path.sig`), atomically; a stale .sig is removed.

    The signature goes first: a reader that sees the new weights then also sees their
    signature (an old .sig beside new weights would only make verification fail, loudly).
    """
    path = Path(path)
    unknown = set(bundle) - {WEIGHTS, SIGNATURE}
    if WEIGHTS not in bundle or unknown:
        raise InputError(f"{sender} sent a malformed weight bundle (entries {sorted(bundle)})", path)
    sig = signature_path(path)
    if SIGNATURE in bundle:
        write_bytes_atomic(sig, bundle[SIGNATURE])
    elif sig.exists():
        sig.unlink()
    write_bytes_atomic(path, bundle[WEIGHTS])
    return path

"""Who sent a weight file: Ed25519 keys per site and a detached signature beside each file.

Each site (and the coordinator) makes a key pair once with `fedseg keygen`. The private key
never leaves its owner (file mode 0600, refused when others can read it, as ssh does); the
public key goes into the plan (`fedseg plan --keys DIR` -> `plans.keys`), so it is covered
by `plan_id` and cannot be swapped later without every site noticing.

A signature is a small JSON file `<weight file>.sig` written atomically beside the weight file:

    {"format": "fedseg-signature-v1", "signer": "site_a",
     "content_hash": "<the file's content_hash>", "sha256": "<sha256 of the file bytes>",
     "signature": "<128 hex digits>"}

The signed message is `fedseg-signature-v1\\0` + the canonical JSON (sorted keys, no spaces)
of {"content_hash", "sha256", "signer"}. Why the content hash: it already commits to every
metadata field (plan_id, round, site, n_cases, scopes) and every tensor byte, and every reader
verifies it anyway (`read_weight_file`, the validation pass), so checking a signature costs
one Ed25519 verification and no second pass over the data. The file sha256 is signed too so
that `sha256sum` users can cross-check; the writer computes it while writing. The
coordinator's validation compares it for format-version-1 files only (their sha256 content
hash would cost as much as the sha256 of their bytes); a version-2 file is checked by its
verified BLAKE3 content hash alone, so its bytes are hashed once.

Signing says who made a file, not that its content is good: validation and robust
combiners deal with that (see docs/security.md).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedseg.atomic import atomic_path, write_text_atomic
from fedseg.errors import InputError
from fedseg.federation.weightfile import open_weight_file
from fedseg.names import check_site_name, path_inside

SIGNATURE_FORMAT = "fedseg-signature-v1"
PRIVATE_FORMAT = "fedseg-ed25519-private-v1"
PUBLIC_FORMAT = "fedseg-ed25519-public-v1"
SIG_SUFFIX = ".sig"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
COORDINATOR = "coordinator"     # the signer name of everything `init` and `aggregate` write
# a key file also holds the site's X25519 key-agreement pair (secure aggregation's masks)
AGREEMENT_PRIVATE_FIELD = "agreement_private_key"
AGREEMENT_PUBLIC_FIELD = "agreement_public_key"
_DOMAIN = b"fedseg-signature-v1\x00"
# A signature file is a few hundred bytes; anything far larger is not one (and is not read).
_MAX_SIG_BYTES = 64_000


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key and the name it signs as."""

    signer: str
    private: Any                 # cryptography's Ed25519PrivateKey
    path: Path

    @property
    def public_hex(self) -> str:
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return raw.hex()

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


@dataclass(frozen=True)
class Signature:
    signer: str
    content_hash: str
    sha256: str
    signature: str               # hex


# ---------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------
def _check_signer_name(signer: str) -> str:
    return check_site_name(signer, what="key owner name")


def generate_key(signer: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<signer>.key` (private, mode 0600) and `<signer>.pub` under `out_dir`: an Ed25519
    signing pair and an X25519 key-agreement pair (secure aggregation) in the same two files.

    Refuses to overwrite an existing private key: losing a key locks a site out of the plan.
    """
    _check_signer_name(signer)
    out_dir = Path(out_dir)
    private_path = path_inside(out_dir, f"{signer}{PRIVATE_SUFFIX}")
    public_path = path_inside(out_dir, f"{signer}{PUBLIC_SUFFIX}")
    if private_path.exists():
        raise InputError("a private key already exists here; refusing to overwrite it", private_path)
    key = Ed25519PrivateKey.generate()
    private_hex = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()
    public_hex = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    # the X25519 key pair for secure aggregation's pairwise masks travels in the same files
    agreement_private, agreement_public = new_agreement_pair()
    # atomic_path's temporary file is created with mode 0600 (mkstemp), so the private key
    # is never readable by others, not even for a moment.
    with atomic_path(private_path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(json.dumps({
            "format": PRIVATE_FORMAT, "signer": signer, "private_key": private_hex, AGREEMENT_PRIVATE_FIELD: agreement_private,
        }, indent=2) + "\n")
    with atomic_path(public_path) as tmp:
        tmp.write_text(json.dumps({
            "format": PUBLIC_FORMAT, "signer": signer, "public_key": public_hex, AGREEMENT_PUBLIC_FIELD: agreement_public,
        }, indent=2) + "\n")
        os.chmod(tmp, 0o644)
    return private_path, public_path


def new_agreement_pair() -> tuple[str, str]:
    """(private hex, public hex) of a fresh X25519 key pair."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private.hex(), public.hex()


def _read_key_json(path: Path, fmt: str, field: str) -> tuple[str, bytes]:
    if not path.is_file():
        raise InputError("key file not found", path)
    try:
        if path.stat().st_size > _MAX_SIG_BYTES:
            raise ValueError("too large")
        body = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(body, dict) or body.get("format") != fmt:
            raise ValueError("wrong format")
        signer = _check_signer_name(body["signer"])
        raw = bytes.fromhex(body[field])
        if len(raw) != 32:
            raise ValueError("wrong length")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, InputError):
        kind = "private" if fmt == PRIVATE_FORMAT else "public"
        raise InputError(f"not a fedseg {kind} key file (expected JSON from `fedseg keygen`)", path) from None
    return signer, raw


def load_signing_key(path: str | Path) -> SigningKey:
    """Load a private key; refused when group or others may read it (as ssh refuses)."""
    path = Path(path)
    if path.is_file() and os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise InputError(f"private key permissions {mode:04o} are too open; run `chmod 600 {path}`", path)
    signer, raw = _read_key_json(path, PRIVATE_FORMAT, "private_key")
    return SigningKey(signer, Ed25519PrivateKey.from_private_bytes(raw), path)


def load_public_key(path: str | Path) -> tuple[str, str]:
    """(signer, public key hex) from a `.pub` file."""
    signer, raw = _read_key_json(Path(path), PUBLIC_FORMAT, "public_key")
    return signer, raw.hex()


def load_public_keys(folder: str | Path) -> dict[str, str]:
    """{signer: public key hex} from every `*.pub` file in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("key folder not found (expected a folder of .pub files from `fedseg keygen`)", folder)
    keys: dict[str, str] = {}
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        signer, public = load_public_key(path)
        if signer in keys:
            raise InputError(f"a second public key for {signer!r}", path)
        keys[signer] = public
    if not keys:
        raise InputError("no public keys (*.pub) in the key folder", folder)
    return keys


def check_plan_keys(keys: dict[str, str], sites: list[str]) -> None:
    """Every site and the coordinator need a key; keys of unknown signers are a mistake."""
    unknown = sorted(set(keys) - set(sites) - {COORDINATOR})
    if unknown:
        raise InputError(f"public keys for signers that are not sites of the plan: {', '.join(unknown)}")
    missing = sorted(set(sites) - set(keys)) + ([] if COORDINATOR in keys else [COORDINATOR])
    if missing:
        raise InputError(
            f"no public key for {', '.join(missing)}; with --keys every site and the coordinator need one "
            f"(fedseg keygen --site NAME -o DIR)"
        )


def require_signing_key(keys: dict[str, str], key: SigningKey | None, signer: str, option: str = "--key") -> SigningKey | None:
    """The key `signer` must sign with under a plan with `keys` (None when the plan has none).

    Checked before any work, so a site does not train for an hour and then fail to sign.
    """
    if not keys:
        return key
    if key is None:
        raise InputError(f"the plan lists public keys, so files from {signer!r} must be signed: give {option} with its private key")
    if key.signer != signer:
        raise InputError(f"is the key of {key.signer!r}, but it would sign as {signer!r}", key.path)
    if keys.get(signer) != key.public_hex:
        raise InputError(f"does not match the plan's public key for {signer!r}", key.path)
    return key


# ---------------------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------------------
def signature_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIG_SUFFIX)


def _message(signer: str, content_hash: str, sha256: str) -> bytes:
    body = {"content_hash": content_hash, "sha256": sha256, "signer": signer}
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def write_signature(path: str | Path, key: SigningKey, content_hash: str, sha256: str) -> Path:
    """Sign a weight file (by its content hash and file sha256) into `<path>.sig`, atomically.

    Ed25519 signatures are deterministic, so signing the same file again gives the same bytes.
    """
    signature = key.sign(_message(key.signer, content_hash, sha256)).hex()
    body = {
        "format": SIGNATURE_FORMAT, "signer": key.signer, "content_hash": content_hash, "sha256": sha256,
        "signature": signature,
    }
    target = signature_path(path)
    write_text_atomic(target, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return target


def sign_weight_file(path: str | Path, key: SigningKey) -> Path:
    """Sign an existing weight file (reads it once to verify its content hash and sha256)."""
    with open_weight_file(path) as reader:
        reader.verify_hash()
        return write_signature(path, key, reader.meta.content_hash, reader.file_sha256())


def read_signature(path: str | Path) -> Signature:
    """Parse `<path>.sig`; InputError (naming the weight file) when missing or malformed."""
    path = Path(path)
    sig_path = signature_path(path)
    if not sig_path.is_file():
        raise InputError(f"is not signed (no {sig_path.name} beside it) and the plan requires signatures", path)
    try:
        if sig_path.stat().st_size > _MAX_SIG_BYTES:
            raise ValueError("too large")
        body = json.loads(sig_path.read_text(encoding="utf-8"))
        if not isinstance(body, dict) or body.get("format") != SIGNATURE_FORMAT:
            raise ValueError("wrong format")
        fields = {name: body[name] for name in ("signer", "content_hash", "sha256", "signature")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise ValueError("wrong types")
        if len(bytes.fromhex(fields["signature"])) != 64:
            raise ValueError("wrong length")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise InputError(f"signature file {sig_path.name} is malformed", path) from None
    return Signature(**fields)


def verify_signature(
    keys: dict[str, str],
    path: str | Path,
    content_hash: str,
    expected_signer: str,
    sha256: str | None = None,
    what: str = "site",
) -> Signature:
    """Check `<path>.sig` against the plan's keys; InputError naming `path` on any fault.

    `content_hash` must be the file's own (checked against its data by the caller, or to be);
    `sha256` of the file bytes is compared when the caller has it.
    """
    path = Path(path)
    sig = read_signature(path)
    public = keys.get(sig.signer)
    if public is None:
        raise InputError(f"is signed by {sig.signer!r}, who has no public key in the plan", path)
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
            bytes.fromhex(sig.signature), _message(sig.signer, sig.content_hash, sig.sha256)
        )
    except (InvalidSignature, ValueError):
        raise InputError(f"bad signature: it does not verify with {sig.signer!r}'s public key", path) from None
    if sig.signer != expected_signer:
        claimed = f"{what} {expected_signer!r}" if expected_signer != COORDINATOR else "the coordinator"
        raise InputError(f"is signed by {sig.signer!r} but claims to come from {claimed}", path)
    if sig.content_hash != content_hash:
        raise InputError("bad signature: it was made for other content (the file was altered after signing)", path)
    if sha256 is not None and sig.sha256 != sha256:
        raise InputError("bad signature: the file bytes differ from the signed ones (sha256 mismatch)", path)
    return sig

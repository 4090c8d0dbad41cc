"""Secure aggregation by pairwise masking (Bonawitz et al., CCS 2017, without the double mask).

Every site has an X25519 key-agreement key pair (made by `fedseg keygen` beside its Ed25519
signing key, in the same files); the public halves are in the plan
(plans.extra["secure_aggregation"]["public_keys"]), covered by plan_id, so the coordinator
cannot swap a key without every site noticing.

For round r and pool p, sites i and j derive the same 32-byte seed
    s_ij = HKDF-SHA256(X25519(i, j), info = canonical JSON {domain, plan_id, round, pool, pair})
and expand it per pool key with ChaCha20 (a cryptographic PRG) into uniform 64-bit words m_ij.
Site i sends, per coordinate, in the ring Z / 2^64:
    y_i = encode(a_i · x_i) + Σ_{j > i} m_ij − Σ_{j < i} m_ij        (j over the pool's other sites)
where a_i is the site's weight in the pool (n_cases, or 1) and encode is fixed point with a
scale of 2^32. Each m_ij appears once with + and once with −, so Σ_i y_i = Σ_i encode(a_i x_i)
mod 2^64: the coordinator decodes that sum and divides by Σ a_i (sent in the clear as n_cases).
One y_i alone is x_i plus uniform words nobody but i and j can compute: uniform to the coordinator.

Fixed point, 2^64 and 2^32: the sum must never wrap. Each site refuses a coordinate with
|a_i x_i| >= 2^31 / N (N = sites in the plan), so |Σ| < 2^31 and |Σ| · 2^32 < 2^63: the sum is an
exact signed 64-bit integer. 2^31 / N is ~2.7e8 for 8 sites, far above any n_cases-weighted
network weight; the resolution 2^-32 ≈ 2.3e-10 is finer than float32's for any |x| > 0.004,
so the masked mean equals the plain one to float32 precision. A 32-bit ring would halve the
bytes but leave ~15 bits of resolution for a sum of n_cases-weighted weights: too coarse.

Dropout: if site d sent no update after the others masked with it, its masks m_id stay in the
survivors' y_i. Each survivor i then reveals its seeds s_id (for this round and d's pools
only) in a recovery file; the coordinator regenerates m_id and removes them. What that
protects: the seeds are per round and per pool, so they unmask nothing of any other round,
and a survivor's own update stays hidden behind its masks with the other survivors. What it
does not: a coordinator that received d's file and claims d dropped could unmask d with the
seeds (the paper's double mask with Shamir shares closes that; this implementation trusts the
coordinator to report dropouts honestly). Once the seeds of d are used, a late file from d
is refused (the dropout record `secure_aggregation.json` in the round folder), because with
those seeds it would be readable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedseg.atomic import write_json_atomic
from fedseg.errors import InputError
from fedseg.federation.signing import AGREEMENT_PRIVATE_FIELD, AGREEMENT_PUBLIC_FIELD, PUBLIC_SUFFIX, load_signing_key

PLAN_KEY = "secure_aggregation"          # plans.extra[PLAN_KEY] = {"public_keys": {site: hex}, ...}
MODULUS_BITS = 64
SCALE_BITS = 32
WIRE_DTYPE = "uint64"
RECOVERY_FORMAT = "fedseg-secagg-recovery-v1"
DROPOUT_RECORD = "secure_aggregation.json"
_SEED_DOMAIN = "fedseg-secagg-mask-v1"
_SCALE = float(2 ** SCALE_BITS)
_MAX_RECOVERY_BYTES = 1_000_000


# ---------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgreementKey:
    """A site's X25519 private key (from its `fedseg keygen` .key file)."""

    site: str
    private: Any                 # cryptography's X25519PrivateKey
    path: Path

    @property
    def public_hex(self) -> str:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _key_field(path: Path, field: str) -> tuple[str, bytes]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        raw = bytes.fromhex(body[field])
        if len(raw) != 32 or not isinstance(body["signer"], str):
            raise ValueError("wrong length")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError(
            f"holds no key-agreement key ({field}); make the site's keys with this fedseg's `fedseg keygen`", path
        ) from None
    return body["signer"], raw


def load_agreement_key(path: str | Path) -> AgreementKey:
    """The X25519 private key in a site's `.key` file (checked for permissions by load_signing_key)."""
    path = Path(path)
    load_signing_key(path)   # the same file: format and mode 0600 checks
    site, raw = _key_field(path, AGREEMENT_PRIVATE_FIELD)
    return AgreementKey(site, X25519PrivateKey.from_private_bytes(raw), path)


def load_agreement_public_keys(folder: str | Path, sites: Sequence[str]) -> dict[str, str]:
    """{site: X25519 public hex} from `<site>.pub` in `folder` for every site of the plan."""
    keys = {}
    for site in sorted(sites):
        path = Path(folder) / f"{site}{PUBLIC_SUFFIX}"
        if not path.is_file():
            raise InputError(f"no public key for site {site!r}; secure aggregation needs every site's (fedseg keygen --site {site})", path)
        signer, raw = _key_field(path, AGREEMENT_PUBLIC_FIELD)
        if signer != site:
            raise InputError(f"is the key of {signer!r}, not of site {site!r}", path)
        keys[site] = raw.hex()
    return keys


def plan_public_keys(plans: Any) -> dict[str, str]:
    entry = plans.extra.get(PLAN_KEY)
    keys = entry.get("public_keys") if isinstance(entry, dict) else None
    return dict(keys) if isinstance(keys, dict) else {}


def require_agreement_key(plans: Any, key: AgreementKey | None, site: str) -> AgreementKey:
    """The site's agreement key, checked against the plan before any training."""
    if key is None:
        raise InputError(f"the plan uses secure aggregation: give --key with site {site!r}'s private key (fedseg keygen)")
    if key.site != site:
        raise InputError(f"is the key of {key.site!r}, not of site {site!r}", key.path)
    if plan_public_keys(plans).get(site) != key.public_hex:
        raise InputError(f"does not match the plan's key-agreement public key for {site!r}", key.path)
    return key


# ---------------------------------------------------------------------------------------
# seeds, masks, fixed point
# ---------------------------------------------------------------------------------------
def pair_seed(key: AgreementKey, peer: str, peer_public_hex: str, plan_id: str, round_index: int, pool: str) -> bytes:
    """The seed `key.site` and `peer` share for (plan, round, pool): both compute the same bytes."""
    shared = key.private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_public_hex)))
    info = json.dumps(
        {"domain": _SEED_DOMAIN, "plan_id": plan_id, "round": int(round_index), "pool": pool, "pair": sorted([key.site, peer])},
        sort_keys=True, separators=(",", ":"),
    ).encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask(seed: bytes, pool_key: str, size: int) -> np.ndarray:
    """`size` uniform uint64 words: ChaCha20 keystream under `seed`, one stream per pool key."""
    # 16-byte ChaCha20 nonce: an all-zero block counter, then 8 bytes naming the pool key
    nonce = bytes(8) + hashlib.sha256(pool_key.encode("utf-8")).digest()[:8]
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(8 * size))
    return np.frombuffer(stream, dtype="<u8").copy()


def value_bound(n_sites: int) -> float:
    """Largest |a·x| a site may encode so that the sum of `n_sites` cannot wrap mod 2^64."""
    return float(2 ** (MODULUS_BITS - 1 - SCALE_BITS)) / max(int(n_sites), 1)


def encode(values: np.ndarray, n_sites: int, what: str) -> np.ndarray:
    """float64 -> fixed point in Z/2^64 (two's complement), refusing values that could wrap the sum."""
    values = np.asarray(values, dtype=np.float64)
    bound = value_bound(n_sites)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not peak < bound:
        raise InputError(
            f"{what}: weighted value {peak:.4g} is too large for secure aggregation's fixed point "
            f"(|value| must stay below {bound:.4g} so that the sum of {n_sites} sites cannot wrap mod 2^64)"
        )
    return np.rint(values * _SCALE).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    """The modular sum back to float64 (exact while the sum did not wrap, which `encode` ensures)."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / _SCALE


def apply_pair_masks(values: np.ndarray, site: str, seeds: Mapping[str, bytes], pool_key: str) -> np.ndarray:
    """values + Σ_{peer > site} m − Σ_{peer < site} m (mod 2^64), in place on a uint64 array."""
    flat = values.reshape(-1)
    for peer, seed in sorted(seeds.items()):
        words = mask(seed, pool_key, flat.size)
        if site < peer:
            flat += words
        else:
            flat -= words
    return values


# ---------------------------------------------------------------------------------------
# dropout: recovery files (one per survivor) and the round's dropout record
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recovery:
    site: str                                 # the survivor revealing
    seeds: dict[str, dict[str, bytes]]        # pool -> dropped site -> seed
    path: Path


def write_recovery(
    plans: Any, key: AgreementKey, round_index: int, dropped: Sequence[str], members: Mapping[str, Sequence[str]],
    out: str | Path,
) -> Path:
    """A survivor's recovery file: its seeds with each dropped site, for this round's pools only."""
    site = require_agreement_key(plans, key, key.site).site
    public = plan_public_keys(plans)
    dropped = sorted(set(dropped))
    for other in dropped:
        if other == site:
            raise InputError(f"site {site!r} cannot reveal seeds with itself: it is not a dropped site here")
        if other not in public:
            raise InputError(f"{other!r} is not a site of the plan")
    seeds: dict[str, dict[str, str]] = {}
    for pool, sites in sorted(members.items()):
        if site not in sites:
            continue
        for other in dropped:
            if other in sites:
                seed = pair_seed(key, other, public[other], plans.plan_id, round_index, pool)
                seeds.setdefault(pool, {})[other] = seed.hex()
    body = {"format": RECOVERY_FORMAT, "plan_id": plans.plan_id, "round": int(round_index), "site": site,
            "dropped": dropped, "seeds": seeds}
    write_json_atomic(out, body)
    return Path(out)


def read_recovery(path: str | Path, plan_id: str, round_index: int) -> Recovery:
    path = Path(path)
    if not path.is_file():
        raise InputError("recovery file not found", path)
    try:
        if path.stat().st_size > _MAX_RECOVERY_BYTES:
            raise ValueError("too large")
        body = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(body, dict) or body.get("format") != RECOVERY_FORMAT:
            raise ValueError("wrong format")
        site, seeds = body["site"], {
            pool: {other: bytes.fromhex(seed) for other, seed in by_site.items()} for pool, by_site in body["seeds"].items()
        }
        if not isinstance(site, str) or any(len(s) != 32 for by_site in seeds.values() for s in by_site.values()):
            raise ValueError("wrong types")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        raise InputError("not a secure-aggregation recovery file (fedseg reveal-seeds)", path) from None
    if body.get("plan_id") != plan_id:
        raise InputError("was made under another plan", path)
    if body.get("round") != round_index:
        raise InputError(f"is for round {body.get('round')}, the updates are of round {round_index}", path)
    return Recovery(site, seeds, path)


def recovered_sites(round_dir: Path) -> list[str]:
    """Sites whose masks were already recovered in this round folder (their late files are refused)."""
    path = Path(round_dir) / DROPOUT_RECORD
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["dropped"])
    except (ValueError, KeyError, TypeError):
        raise InputError("is damaged; it records which sites' masks were recovered", path) from None


def write_dropout_record(round_dir: Path, round_index: int, dropped: Sequence[str], recoveries: Sequence[Recovery]) -> None:
    write_json_atomic(Path(round_dir) / DROPOUT_RECORD, {
        "round": int(round_index), "dropped": sorted(set(dropped) | set(recovered_sites(round_dir))),
        "recovered_by": sorted(r.site for r in recoveries),
    })

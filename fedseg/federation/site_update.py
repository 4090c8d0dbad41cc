"""A site's side of the weight-file protocol: what it starts from and what it sends.

`compose_site_state` completes the site's local tensors with the incoming model file;
`split_site_state` divides a trained state into what is sent and what stays, and
`write_site_update` writes the sent part. All three read the plan's route table
(fedseg.federation.routes), the same table the coordinator validates and merges by.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.privacy import SitePrivacy
from fedseg.federation.routes import route_table
from fedseg.federation.signing import COORDINATOR, SigningKey, verify_signature, write_signature
from fedseg.federation.weightfile import (
    WeightMeta,
    check_declared_tensors,
    describe,
    open_weight_file,
    to_numpy,
    write_weight_file_digest,
)

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


def split_site_state(plans: Plans, site: str, state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(shared, local): shared = what the site sends (routed to a pool), local = what stays."""
    return _split(route_table(plans).sent(site), state)


def _split(sent: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    shared: dict[str, np.ndarray] = {}
    local: dict[str, np.ndarray] = {}
    for name, value in state.items():
        (shared if name in sent else local)[name] = to_numpy(value)
    return shared, local


def compose_site_state(
    plans: Plans, site: str, incoming_path: str | Path, local_state: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """The full model `site` starts from: its local tensors overlaid with the incoming model file.

    The incoming file must be a model file of this plan for this site (or one of the plan's
    pool models); every tensor must be a parameter of the site's network with the manifest's
    shape and dtype; whatever is neither incoming nor local is an InputError.
    """
    path = Path(incoming_path)
    expected = expected_parameters(plans, site)
    state: dict[str, np.ndarray] = {name: to_numpy(v) for name, v in (local_state or {}).items()}
    with open_weight_file(path) as reader:
        meta = reader.meta
        if meta.plan_id != plans.plan_id:
            raise InputError(f"was made under another plan (plan_id {meta.plan_id[:12]}…, this plan {plans.plan_id[:12]}…)", path)
        # the header against the manifest before any tensor byte is read: what is hashed and
        # copied below is at most one model, whatever the file declares
        check_declared_tensors(reader, expected, f"site {site!r}'s network")
        reader.verify_hash()   # streamed from the mapping, nothing copied
        if meta.kind != "model":
            raise InputError(f"is a {meta.kind!r} file; a site starts from a model file (round_r/<site>.safetensors)", path)
        if plans.keys:
            # the content hash was verified, so the signature over it covers the data
            verify_signature(plans.keys, path, meta.content_hash, COORDINATOR)
        if meta.site in plans.sites and meta.site != site:
            raise InputError(f"is the model for site {meta.site!r}, not {site!r}", path)
        for name, array in reader.iter_tensors():
            state[name] = np.array(array)   # writable copies that outlive the mapping
    missing = set(expected) - set(state)
    if missing:
        raise InputError(f"lacks {len(missing)} tensor(s) that the site has no local copy of: {describe(missing)}", path)
    return {name: state[name] for name in expected}


def write_signed(path: Path, tensors: Mapping[str, Any], meta: WeightMeta, signing_key: SigningKey | None) -> WeightMeta:
    """Write a weight file and, with a key, its `.sig` (signing the digest computed while writing)."""
    written, digest = write_weight_file_digest(path, tensors, meta)
    if signing_key is not None:
        write_signature(path, signing_key, written.content_hash, digest)
    return written


def write_site_update(
    plans: Plans,
    site: str,
    state: Mapping[str, Any],
    path: str | Path,
    *,
    round_index: int,
    n_iterations: int,
    n_cases: int | None = None,
    extra: dict[str, Any] | None = None,
    signing_key: SigningKey | None = None,
    privacy: SitePrivacy | None = None,
) -> WeightMeta:
    """Write the update of `site` for `round_index`: only its routed tensors, with their pools.

    With `signing_key` (the site's own), `<path>.sig` is written too. With `privacy` (plans
    with secure_aggregation / dp.*), the tensors are clipped, noised and masked first."""
    sent = route_table(plans).sent(site)
    shared, _local = _split(sent, state)
    n_cases = plans.sites[site].n_cases if n_cases is None else int(n_cases)
    if privacy is not None:
        shared = privacy.protect(plans, site, shared, int(round_index), n_cases)
    meta = WeightMeta(
        kind="update", plan_id=plans.plan_id, strategy=plans.strategy.name, site=site, round=int(round_index),
        n_cases=n_cases, n_iterations=int(n_iterations),
        scopes={name: sent[name].pool for name in shared}, extra=dict(extra or {}),
    )
    return write_signed(Path(path), shared, meta, signing_key)

"""The record of an aggregated round (`round_r/aggregate.json`): inputs, weights, outputs, traffic.

Written last, as the commit record of the round folder (fedseg.federation.round_commit): it lists
every output's sha256, so a round folder is complete when this file exists.

An input is named by its content hash (`InputRecord.content_hash`), which validation verified
against its data: a version-2 file is read and hashed once, by that pass. `sha256` (of the
file bytes) is recorded for version-1 inputs only, whose validation computes it; records
written before content hashes named inputs have `sha256` alone, and are still read
(`is_recorded_input`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedseg.federation.round_commit import AGGREGATE_RECORD
from fedseg.federation.validation import ValidatedUpdate

REPORT_FILE = AGGREGATE_RECORD


@dataclass
class InputRecord:
    site: str
    path: str
    sha256: str | None              # of the file bytes: version-1 inputs only (None for version 2)
    bytes: int
    n_cases: int
    n_iterations: int
    update_norm: float | None       # None when it overflowed float64 (never for float32 weights)
    extra: dict[str, Any] = field(default_factory=dict)   # the site's own metrics (val_dice, ...)
    delta_norm: float | None = None   # L2 norm of (update - model it started from), with clip_norm
    clip_factor: float | None = None  # scale applied to that delta (1.0: within clip_norm)
    # the verified content hash: what names the input (None only in records written before)
    content_hash: str | None = None


@dataclass
class OutputRecord:
    path: str                       # relative to the round folder
    kind: str                       # "site" | "pool"
    name: str                       # site or pool name
    n_tensors: int
    bytes: int
    sha256: str
    same_as: str | None = None      # a hard link to (or copy of) this pool model file


@dataclass
class AggregateReport:
    round: int
    plan_id: str
    strategy: str
    inputs: list[InputRecord]
    weights: dict[str, dict[str, float] | None]    # pool -> site -> weight (None: not a simple weighting)
    outputs: list[OutputRecord]
    missing_sites: list[str]                       # plan sites that sent no update this round
    robust: dict[str, Any] | None = None           # robust combiner used (fedseg.federation.robust), if any
    signed_by: str | None = None                   # "coordinator" when the outputs carry signatures
    # bytes on the wire this round: per site, "upload" (its update file) and "download" (the
    # model file it loads next), plus totals; what communication-efficient strategies save
    traffic: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None          # secure aggregation / DP record, ε so far (fedseg.federation.privacy)
    # the sites' validation Dice of the previous round's models (fedseg.federation.best_round)
    validation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> AggregateReport:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in body.items() if k in names}
        fields["inputs"] = [InputRecord(**i) for i in body["inputs"]]
        fields["outputs"] = [OutputRecord(**o) for o in body["outputs"]]
        return cls(**fields)



def round_traffic(inputs: Sequence[InputRecord], outputs: Sequence[OutputRecord]) -> dict[str, Any]:
    """{"per_site": {site: {"upload": bytes, "download": bytes}}, "upload": total, "download": total}."""
    per_site: dict[str, dict[str, int]] = {}
    for record in inputs:
        per_site.setdefault(record.site, {"upload": 0, "download": 0})["upload"] = int(record.bytes)
    for record in outputs:
        if record.kind == "site":
            per_site.setdefault(record.name, {"upload": 0, "download": 0})["download"] = int(record.bytes)
    return {
        "per_site": dict(sorted(per_site.items())),
        "upload": sum(v["upload"] for v in per_site.values()),
        "download": sum(v["download"] for v in per_site.values()),
    }


def input_record(update: ValidatedUpdate, delta_norm: float | None = None, factor: float | None = None) -> InputRecord:
    """The report's line for one validated update (`delta_norm`, `factor`: its clip_norm measurement)."""
    return InputRecord(
        delta_norm=delta_norm,
        clip_factor=factor,
        site=update.site,
        path=str(update.path),
        sha256=update.sha256,
        content_hash=update.content_hash,
        bytes=update.n_bytes,
        n_cases=update.meta.n_cases,
        n_iterations=update.meta.n_iterations,
        update_norm=update.update_norm if math.isfinite(update.update_norm) else None,
        extra=update.meta.extra,
    )




def is_recorded_input(item: Mapping[str, Any], content_hash: str, file_sha256: Callable[[], str]) -> bool:
    """Whether a file whose verified content hash is `content_hash` is the input `item` of a
    round record: by content hash, or, in a record written before content hashes named
    inputs, by the sha256 of its bytes (`file_sha256` is called only then)."""
    recorded = item.get("content_hash")
    if recorded is not None:
        return recorded == content_hash
    return item.get("sha256") is not None and item.get("sha256") == file_sha256()

"""Where a federation stands, read from its run folder alone (`fedseg status`, `fedseg report`).

A run folder (docs/file-protocol.md) is the whole record of a federation, whether `fedseg
simulate`, `fedseg flower serve` or shell scripts wrote it: plans.json says what was planned,
round_r/aggregate.json what each complete round took in (sites, update norms, the sites' own
metrics and training curves in each input's `extra`, bytes on the wire, signatures), and
round_r/updates/ what has arrived for the round under way. Nothing here writes.

Wall time comes from file modification times (plans.json to each round's aggregate.json):
the only clock a folder written by many machines and scripts shares.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedseg.errors import InputError
from fedseg.federation.quorum import MIN_SITES

AGGREGATE_FILE = "aggregate.json"
# round_r/site_failures.json: {site: reason}, the sites a Flower round went on without
SITE_FAILURES_FILE = "site_failures.json"
SIGNATURE_SUFFIX = ".sig"
STATUS_FORMAT = "fedseg-status/1"


@dataclass
class SiteRound:
    site: str
    val_dice: float | None
    mean_loss: float | None
    update_norm: float | None
    upload_bytes: int | None
    download_bytes: int | None
    curve: dict[str, list] = field(default_factory=dict)   # {"iteration", "loss", "lr"} as the site reported it


@dataclass
class RoundStatus:
    round: int
    complete: bool                     # aggregate.json exists
    sites_in: list[str]                # sites whose update was aggregated (complete) or has arrived (pending)
    sites_missing: list[str]
    mean_val_dice: float | None
    sites: list[SiteRound]
    signed: bool | None                # complete: outputs signed by the coordinator; pending: every arrived update has a .sig
    wall_s: float | None               # complete rounds: since the previous round finished (plans.json for round 1)
    bytes: int | None                  # uploads + downloads of the round
    failures: dict[str, str] = field(default_factory=dict)   # site -> why it is missing (Flower runs)
    # privacy of the round, from aggregate.json: {"secure_aggregation": bool, "epsilon": ε so far
    # or None, "delta": δ or None}; None when the plan uses neither secure aggregation nor DP
    privacy: dict[str, Any] | None = None


@dataclass
class RunStatus:
    format: str
    run_dir: str
    plan_id: str
    strategy: str
    sites: list[str]
    min_sites: int
    rounds_planned: int
    rounds_completed: int
    signing_required: bool
    initialised: bool                  # round_000 written
    rounds: list[RoundStatus]
    wall_s: float | None               # plans.json to the last complete round
    test_metrics: dict[str, Any]       # report/metrics.json "test", when present
    next_action: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read ({exc})", path) from None
    if not isinstance(value, dict):
        raise InputError("is not a JSON object", path)
    return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round_{r:03d}"


def _failures(run_dir: Path, r: int) -> dict[str, str]:
    path = _round_dir(run_dir, r) / SITE_FAILURES_FILE
    return {str(k): str(v) for k, v in _read_json(path).items()} if path.is_file() else {}


def _complete_round(run_dir: Path, r: int, sites: list[str], started: float | None) -> RoundStatus:
    path = _round_dir(run_dir, r) / AGGREGATE_FILE
    record = _read_json(path)
    traffic = (record.get("traffic") or {}).get("per_site") or {}
    per_site = []
    for item in sorted(record.get("inputs", []), key=lambda i: str(i.get("site"))):
        extra = item.get("extra") or {}
        moved = traffic.get(item.get("site")) or {}
        per_site.append(SiteRound(
            site=str(item.get("site")),
            val_dice=_number(extra.get("val_dice")),
            mean_loss=_number(extra.get("mean_loss")),
            update_norm=_number(item.get("update_norm")),
            upload_bytes=moved.get("upload", item.get("bytes")),
            download_bytes=moved.get("download"),
            curve=extra.get("curve") if isinstance(extra.get("curve"), dict) else {},
        ))
    sites_in = [s.site for s in per_site]
    dice = [s.val_dice for s in per_site if s.val_dice is not None]
    finished = path.stat().st_mtime
    total_bytes = None
    if traffic:
        total_bytes = int(sum(int(v.get("upload", 0)) + int(v.get("download", 0)) for v in traffic.values()))
    return RoundStatus(
        round=r, complete=True, sites_in=sites_in,
        sites_missing=sorted(record.get("missing_sites", sorted(set(sites) - set(sites_in)))),
        mean_val_dice=statistics.fmean(dice) if dice else None, sites=per_site,
        signed=record.get("signed_by") is not None,
        wall_s=None if started is None else max(0.0, finished - started), bytes=total_bytes,
        failures=_failures(run_dir, r),
        privacy=_privacy(record.get("privacy")),
    )


def _privacy(record: Any) -> dict[str, Any] | None:
    """The round's privacy state as status shows it: masked or not, ε at δ spent so far."""
    if not isinstance(record, dict) or (record.get("secure_aggregation") is None and record.get("dp") is None):
        return None
    dp = record.get("dp") if isinstance(record.get("dp"), dict) else {}
    return {
        "secure_aggregation": record.get("secure_aggregation") is not None,
        "epsilon": _number(dp.get("epsilon")),
        "delta": _number(dp.get("delta")),
    }


def _pending_round(run_dir: Path, r: int, sites: list[str]) -> RoundStatus:
    updates = _round_dir(run_dir, r) / "updates"
    arrived = sorted(p.name[: -len(".safetensors")] for p in updates.glob("*.safetensors")) if updates.is_dir() else []
    arrived = [s for s in arrived if s in sites]
    signed = all((updates / f"{s}.safetensors{SIGNATURE_SUFFIX}").is_file() for s in arrived) if arrived else None
    return RoundStatus(
        round=r, complete=False, sites_in=arrived, sites_missing=sorted(set(sites) - set(arrived)),
        mean_val_dice=None, sites=[], signed=signed, wall_s=None, bytes=None, failures=_failures(run_dir, r),
    )


def run_status(run_dir: str | Path) -> RunStatus:
    """The state of the federation in `run_dir` (InputError when it is not a run folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("run folder not found", run_dir)
    plans_path = run_dir / "plans.json"
    if not plans_path.is_file():
        raise InputError("holds no plans.json, so it is not a fedseg run folder", run_dir)
    plans = _read_json(plans_path)
    try:
        sites = sorted(plans["sites"])
        strategy = str(plans["strategy"]["name"])
        params = plans["strategy"].get("params") or {}
        rounds_planned = int(plans["training"]["rounds"])
        plan_id = str(plans.get("plan_id", ""))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError("is not a fedseg plans file", plans_path) from None
    min_sites = params.get(MIN_SITES) if isinstance(params.get(MIN_SITES), int) else len(sites)

    rounds: list[RoundStatus] = []
    previous_finish: float | None = plans_path.stat().st_mtime
    first_start = previous_finish
    for r in range(1, rounds_planned + 1):
        if (_round_dir(run_dir, r) / AGGREGATE_FILE).is_file():
            status = _complete_round(run_dir, r, sites, previous_finish)
            previous_finish = (_round_dir(run_dir, r) / AGGREGATE_FILE).stat().st_mtime
            rounds.append(status)
            continue
        rounds.append(_pending_round(run_dir, r, sites))
        break
    completed = sum(1 for s in rounds if s.complete)
    test_metrics = _test_metrics(run_dir, sites)
    initialised = any(_round_dir(run_dir, 0).glob("*.safetensors")) if _round_dir(run_dir, 0).is_dir() else False
    return RunStatus(
        format=STATUS_FORMAT, run_dir=str(run_dir), plan_id=plan_id, strategy=strategy, sites=sites,
        min_sites=min_sites, rounds_planned=rounds_planned, rounds_completed=completed,
        signing_required=bool(plans.get("keys")), initialised=initialised, rounds=rounds,
        wall_s=(previous_finish - first_start) if completed and first_start is not None else None,
        test_metrics=test_metrics,
        next_action=next_action(rounds, rounds_planned, min_sites, initialised, bool(test_metrics)),
    )


def _test_metrics(run_dir: Path, sites: list[str]) -> dict[str, Any]:
    """Per-site test metrics: report/metrics.json's "test" (simulate, flower), else each site's
    metrics_<site>.json (fedseg evaluate's output) under report/ or the run folder (shell runs)."""
    summary = run_dir / "report" / "metrics.json"
    if summary.is_file():
        return _read_json(summary).get("test") or {}
    found: dict[str, Any] = {}
    for site in sites:
        for folder in (run_dir / "report", run_dir):
            path = folder / f"metrics_{site}.json"
            if path.is_file():
                metrics = _read_json(path)
                found[site] = {"mean": metrics.get("mean"), "foreground_mean": metrics.get("foreground_mean")}
                break
    return found


def next_action(rounds: list[RoundStatus], rounds_planned: int, min_sites: int, initialised: bool, tested: bool) -> str:
    """What the federation waits for, in one line."""
    if not initialised:
        return "initialise round 0: fedseg init --plans plans.json -o round_000"
    pending = next((s for s in rounds if not s.complete), None)
    if pending is None:
        if tested:
            return f"done: all {rounds_planned} round(s) complete, with test metrics"
        return f"done: all {rounds_planned} round(s) complete; evaluate the final models (fedseg predict / evaluate)"
    r = pending.round
    if not pending.sites_missing:
        return f"aggregate round {r}: every update is in (fedseg aggregate --plans plans.json round_{r:03d}/updates/*.safetensors -o round_{r:03d})"
    waiting = f"waiting for updates of {', '.join(pending.sites_missing)} for round {r}"
    if len(pending.sites_in) >= min_sites:
        return f"{waiting} (the quorum of {min_sites} is reached: round {r} can be aggregated now)"
    return waiting


# JSON Schema of `fedseg status --json` (what scripts may rely on; tested).
_NUMBER_OR_NULL = {"type": ["number", "null"]}
STATUS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "format", "run_dir", "plan_id", "strategy", "sites", "min_sites", "rounds_planned", "rounds_completed",
        "signing_required", "initialised", "rounds", "wall_s", "test_metrics", "next_action",
    ],
    "properties": {
        "format": {"const": STATUS_FORMAT},
        "run_dir": {"type": "string"},
        "plan_id": {"type": "string"},
        "strategy": {"type": "string"},
        "sites": {"type": "array", "items": {"type": "string"}},
        "min_sites": {"type": "integer", "minimum": 1},
        "rounds_planned": {"type": "integer", "minimum": 0},
        "rounds_completed": {"type": "integer", "minimum": 0},
        "signing_required": {"type": "boolean"},
        "initialised": {"type": "boolean"},
        "wall_s": _NUMBER_OR_NULL,
        "test_metrics": {"type": "object"},
        "next_action": {"type": "string", "minLength": 1},
        "rounds": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "round", "complete", "sites_in", "sites_missing", "mean_val_dice", "sites", "signed", "wall_s", "bytes",
                    "failures",
                ],
                "properties": {
                    "round": {"type": "integer", "minimum": 1},
                    "complete": {"type": "boolean"},
                    "sites_in": {"type": "array", "items": {"type": "string"}},
                    "sites_missing": {"type": "array", "items": {"type": "string"}},
                    "mean_val_dice": _NUMBER_OR_NULL,
                    "signed": {"type": ["boolean", "null"]},
                    "wall_s": _NUMBER_OR_NULL,
                    "bytes": {"type": ["integer", "null"]},
                    "failures": {"type": "object", "additionalProperties": {"type": "string"}},
                    "privacy": {
                        "type": ["object", "null"],
                        "required": ["secure_aggregation", "epsilon", "delta"],
                        "properties": {
                            "secure_aggregation": {"type": "boolean"},
                            "epsilon": _NUMBER_OR_NULL,
                            "delta": _NUMBER_OR_NULL,
                        },
                    },
                    "sites": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["site", "val_dice", "mean_loss", "update_norm", "upload_bytes", "download_bytes", "curve"],
                            "properties": {
                                "site": {"type": "string"},
                                "val_dice": _NUMBER_OR_NULL,
                                "mean_loss": _NUMBER_OR_NULL,
                                "update_norm": _NUMBER_OR_NULL,
                                "upload_bytes": {"type": ["integer", "null"]},
                                "download_bytes": {"type": ["integer", "null"]},
                                "curve": {"type": "object"},
                            },
                        },
                    },
                },
            },
        },
    },
}

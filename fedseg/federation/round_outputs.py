"""Writing an aggregated round: pool models, one model file per site, then aggregate.json.

Everything is staged in the round folder and committed together with the record
(fedseg.federation.round_commit). What a site loads next comes from the route table: its
result from every pool it sends to (the pool's merged tensor, or its own mix in a personal
pool); a site that loads exactly a pool model gets a hard link to that file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.atomic import atomic_path
from fedseg.federation.aggregate_records import REPORT_FILE, AggregateReport, OutputRecord, input_record, round_traffic
from fedseg.federation.best_round import update_best
from fedseg.federation.privacy import PrivateRound
from fedseg.federation.quorum import quorum_note
from fedseg.federation.robust import RobustSpec
from fedseg.federation.round_commit import RoundStage, staged_round
from fedseg.federation.routes import RouteTable, route_table
from fedseg.federation.signing import COORDINATOR, SigningKey, signature_path, write_signature
from fedseg.federation.strategies.base import CombineResult
from fedseg.federation.update_clipping import Clip
from fedseg.federation.validation import ValidatedUpdate
from fedseg.federation.weightfile import WeightMeta, write_weight_file_digest
from fedseg.names import path_inside

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

MODELS_DIR = "models"


@dataclass
class MergedRound:
    """The merged tensors of a round, before anything is written."""

    round_index: int
    by_site: dict[str, ValidatedUpdate]
    plan_id: str              # the plan's id, hashed once (a hash of the whole plan: not per file)
    members: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)   # (pool, key) -> [(site, name)]
    results: dict[tuple[str, str], np.ndarray | dict[str, np.ndarray]] = field(default_factory=dict)
    pool_models: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    weights: dict[str, dict[str, float] | None] = field(default_factory=dict)   # pool -> site -> weight

    def add(self, pool: str, key: str, combined: CombineResult, model: np.ndarray | None, shape: tuple[int, ...],
            dtype: str) -> None:
        """Record the merge of (pool, key), cast once to the manifest's shape and dtype."""
        if isinstance(combined, dict):
            self.results[(pool, key)] = {s: cast_result(a, shape, dtype, pool, key) for s, a in combined.items()}
        else:
            self.results[(pool, key)] = cast_result(combined, shape, dtype, pool, key)
        if model is None:
            return
        if model is combined:  # the shared result itself: reuse the cast array, no copy
            self.pool_models[(pool, key)] = self.results[(pool, key)]
        else:
            self.pool_models[(pool, key)] = cast_result(model, shape, dtype, pool, key)


def cast_result(array: Any, shape: tuple[int, ...], dtype: str, pool: str, key: str) -> np.ndarray:
    """A combined array in the manifest's shape and dtype (the rules return float64)."""
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"strategy returned shape {array.shape} for {pool}/{key}, expected {shape}")
    return np.asarray(array, dtype=np.dtype(dtype), order="C")


@dataclass
class _Writer:
    plans: Plans
    stage: RoundStage
    merged: MergedRound
    signing_key: SigningKey | None

    def write(self, rel: str, kind: str, name: str, tensors: dict[str, np.ndarray], meta: WeightMeta) -> OutputRecord:
        path = path_inside(self.stage.root, *rel.split("/"))
        written, digest = write_weight_file_digest(path, tensors, meta)
        if self.signing_key is not None:
            write_signature(path, self.signing_key, written.content_hash, digest)
        return OutputRecord(path=rel, kind=kind, name=name, n_tensors=len(tensors), bytes=path.stat().st_size, sha256=digest)

    def pool_models(self, table: RouteTable) -> dict[str, tuple[dict[str, np.ndarray], OutputRecord]]:
        """models/<stem>.safetensors for every model pool that received tensors this round."""
        files = {}
        merged = self.merged
        for pool in table.model_pools():
            tensors = {key: arr for (p, key), arr in sorted(merged.pool_models.items()) if p == pool}
            sites = sorted({s for (p, _k), ms in merged.members.items() if p == pool for s, _n in ms})
            meta = WeightMeta(
                kind="model", plan_id=merged.plan_id, strategy=self.plans.strategy.name, site=pool,
                round=merged.round_index, n_cases=sum(merged.by_site[s].meta.n_cases for s in sites),
                n_iterations=sum(merged.by_site[s].meta.n_iterations for s in sites),
                scopes={key: pool for key in tensors}, extra={"sites": sites},
            )
            files[pool] = (tensors, self.write(f"{MODELS_DIR}/{table.pools[pool].model}.safetensors", "pool", pool, tensors, meta))
        return files

    def site_model(self, table: RouteTable, site: str, pool_files: Mapping[str, tuple[dict, OutputRecord]]) -> OutputRecord:
        rel = f"{site}.safetensors"
        tensors, scopes = site_tensors(table, site, self.merged)
        same_as = _identical_pool_file(tensors, scopes, pool_files)
        if same_as is not None:
            # The site loads exactly a pool model (fedavg: every site loads the global model):
            # link to that file instead of writing the same bytes once per site.
            _link_or_copy(self.stage.path(same_as.path), self.stage.path(rel))
            if self.signing_key is not None:   # the same signed content hash and bytes: the same signature
                _link_or_copy(signature_path(self.stage.path(same_as.path)), signature_path(self.stage.path(rel)))
            return dataclasses.replace(same_as, path=rel, kind="site", name=site, same_as=same_as.path)
        update = self.merged.by_site.get(site)
        meta = WeightMeta(
            kind="model", plan_id=self.merged.plan_id, strategy=self.plans.strategy.name, site=site,
            round=self.merged.round_index,
            n_cases=update.meta.n_cases if update else self.plans.sites[site].n_cases,
            n_iterations=update.meta.n_iterations if update else 0,
            scopes=scopes, extra={"participated": update is not None},
        )
        return self.write(rel, "site", site, tensors, meta)


def write_round(
    plans: Plans,
    out_dir: Path,
    merged: MergedRound,
    updates: Sequence[ValidatedUpdate],
    clips: Mapping[str, Clip],
    missing_sites: list[str],
    validation: dict[str, Any] | None,
    robust: RobustSpec,
    private: PrivateRound | None,
    signing_key: SigningKey | None,
    log: Callable[[str], None] | None,
) -> AggregateReport:
    """Stage and commit the round's weight files and its record; returns the record."""
    table = route_table(plans)
    with staged_round(out_dir) as stage:
        writer = _Writer(plans, stage, merged, signing_key)
        pool_files = writer.pool_models(table)
        outputs = [record for _tensors, record in pool_files.values()]
        outputs += [writer.site_model(table, site, pool_files) for site in sorted(plans.sites)]
        report = AggregateReport(
            round=merged.round_index, plan_id=merged.plan_id, strategy=plans.strategy.name,
            inputs=[_input(u, clips.get(u.site)) for u in updates],
            weights={p: (None if robust.replaces_combine else w) for p, w in merged.weights.items()},
            outputs=outputs, missing_sites=missing_sites,
            robust=robust.to_dict() if robust.active else None,
            signed_by=COORDINATOR if signing_key is not None else None,
        )
        if private is not None:
            report.privacy = private.record()
            if private.spec.secure_aggregation:   # masked files hold ring words: no weight norm to state
                for record in report.inputs:
                    record.update_norm = None
        report.traffic = round_traffic(report.inputs, report.outputs)
        report.validation = validation
        stage.commit(REPORT_FILE, report.to_dict(), known={o.path: o.sha256 for o in outputs})
    if log is not None:
        for message in (quorum_note(missing_sites, merged.round_index),
                        f"round {merged.round_index}: wrote {len(outputs)} weight file(s) and {REPORT_FILE} to {out_dir}"):
            if message is not None:
                log(message)
    update_best(out_dir.parent, report.validation, log)
    return report


def _input(update: ValidatedUpdate, clip: Clip | None):
    return input_record(update, None if clip is None else clip.delta_norm, None if clip is None else clip.factor)


def site_tensors(table: RouteTable, site: str, merged: MergedRound) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What `site` loads next: its result from each pool it sends to.

    A personal result without an entry for this site (it sent no update) falls back to the
    pool model; a key nobody contributed to this round is left out, and the site keeps its
    own tensor for it (see compose_site_state).
    """
    tensors: dict[str, np.ndarray] = {}
    scopes: dict[str, str] = {}
    for name, route in table.sent(site).items():
        source = (route.pool, route.key)
        result = merged.results.get(source)
        if result is None:
            continue
        array = result.get(site, merged.pool_models.get(source)) if isinstance(result, dict) else result
        if array is not None:
            tensors[name] = array
            scopes[name] = route.pool
    return tensors, scopes


def _identical_pool_file(
    tensors: Mapping[str, np.ndarray],
    scopes: Mapping[str, str],
    pool_files: Mapping[str, tuple[dict[str, np.ndarray], OutputRecord]],
) -> OutputRecord | None:
    """The pool model file whose tensors are exactly `tensors` (same names, same arrays), if any."""
    pools = set(scopes.values())
    if len(pools) != 1:
        return None
    entry = pool_files.get(pools.pop())
    if entry is None:
        return None
    pool_tensors, record = entry
    if pool_tensors.keys() != tensors.keys() or any(pool_tensors[k] is not tensors[k] for k in tensors):
        return None
    return record


def _link_or_copy(source: Path, target: Path) -> None:
    """Make `target`, a new name in the staged round folder, a hard link to `source` (a copy,
    written atomically, where links are not supported).

    A link needs no fsync of its own: its data is `source`'s, synced when that was written, and
    the new name is synced with the staging folder before the commit; one fsync per site file
    was most of the cost of writing a round's site files."""
    try:
        os.link(source, target)
    except OSError:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)

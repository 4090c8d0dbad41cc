"""The aggregation engine: validated updates in, next round's weight files out.

The strategy says where each parameter goes and how a pool is merged; the engine does the
rest, the same way for every strategy:

- validate every input first (`fedseg.federation.validation`); on any fault nothing is written;
- stream key by key over the memory-mapped updates: each (pool, key) is merged from one
  tensor per contributing site in float64 and cast back to the manifest dtype once, so memory
  is O(model), not O(sites x model) (a strategy that personalises per site holds one result per
  site of that pool, which is inherent to personalisation);
- write `<site>.safetensors` for every site of the plan (what it loads next: only pooled
  tensors), `models/<pool>.safetensors` for the strategy's model pools, then `aggregate.json`,
  the record of every output's sha256: all staged and committed together under the round
  folder's lock (fedseg.federation.round_commit), so a round is the old one or the new one,
  never a mix. A round folder is complete when aggregate.json exists.

Site-side helpers (`compose_site_state`, `split_site_state`, `write_site_update`) live here
too, so what a site sends and what it loads follow the same scope rules as the engine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.atomic import atomic_path
from fedseg.errors import InputError
from fedseg.federation.best_round import update_best, validation_summary
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.privacy import SitePrivacy, prepare_private_round
from fedseg.federation.quorum import check_quorum, quorum_note
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.base import (
    CombineResult,
    Contribution,
    Strategy,
    pool_filename,
    resolved_loads,
    resolved_scope,
)
from fedseg.federation.robust import (
    ClippedTensor,
    RobustSpec,
    clip_factor,
    delta_sumsq,
    parse_robust,
    robust_combine,
)
from fedseg.federation.round_commit import (
    AGGREGATE_RECORD,
    INIT_RECORD,
    check_committed,
    check_output_folder,
    check_round_number,
    damaged_files,
    finish_commit,
    read_record,
    record_files,
    staged_round,
)
from fedseg.federation.signing import COORDINATOR, SigningKey, require_signing_key, verify_signature, write_signature
from fedseg.federation.validation import ValidatedUpdate, validate_updates
from fedseg.federation.weightfile import (
    WeightFileReader,
    WeightMeta,
    check_declared_tensors,
    describe,
    open_reader,
    open_weight_file,
    to_numpy,
    write_weight_file_digest,
)
from fedseg.folder_lock import folder_lock
from fedseg.names import path_inside

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

MODELS_DIR = "models"
REPORT_FILE = AGGREGATE_RECORD


@dataclass
class InputRecord:
    site: str
    path: str
    sha256: str
    bytes: int
    n_cases: int
    n_iterations: int
    update_norm: float | None       # None when it overflowed float64 (never for float32 weights)
    extra: dict[str, Any] = field(default_factory=dict)   # the site's own metrics (val_dice, ...)
    delta_norm: float | None = None   # L2 norm of (update - model it started from), with clip_norm
    clip_factor: float | None = None  # scale applied to that delta (1.0: within clip_norm)


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


def _log(log: Callable[[str], None] | None, message: str | None) -> None:
    if log is not None and message is not None:
        log(message)


def _routing(strategy: Strategy, plans: Plans) -> dict[str, dict[str, tuple[str, str, tuple[int, ...], str]]]:
    """site -> {name: (pool, key, shape, dtype)} for every tensor the site sends."""
    out: dict[str, dict[str, tuple[str, str, tuple[int, ...], str]]] = {}
    for site in sorted(plans.sites):
        entries = {}
        for name, (shape, dtype) in expected_parameters(plans, site).items():
            pool = resolved_scope(strategy, plans, site, name, dtype)
            if pool is not None:
                entries[name] = (pool, strategy.key(plans, site, name), shape, dtype)
        out[site] = entries
    return out


@dataclass
class _Clip:
    previous: WeightFileReader      # the model the site started the round from
    delta_norm: float
    factor: float


def previous_round_dir(out_dir: Path, round_index: int) -> Path:
    """Where the models of round r-1 live by default: `round_<r-1>` beside the round folder."""
    return Path(out_dir).parent / f"round_{round_index - 1:03d}"


def open_previous_model(plans: Plans, site: str, folder: Path, round_index: int) -> WeightFileReader:
    """The checked model file `site` loaded for round `round_index` + 1 (hash, plan, round, signature)."""
    path = Path(folder) / f"{site}.safetensors"
    if not path.is_file():
        raise InputError(
            f"not found: clip_norm measures each update against the model its site started from "
            f"(round {round_index}); pass the previous round folder (--previous)", path,
        )
    check_committed(path)   # only a file its round's record lists
    reader = open_reader(path)
    # header against the manifest first: the hash pass then reads at most one model
    check_declared_tensors(reader, expected_parameters(plans, site), f"site {site!r}'s network")
    reader.verify_hash()
    meta = reader.meta
    if meta.kind != "model" or meta.plan_id != plans.plan_id or meta.round != round_index:
        raise InputError(
            f"is not the round-{round_index} model of this plan (kind {meta.kind!r}, round {meta.round}, "
            f"plan_id {meta.plan_id[:12]}…); pass the previous round folder (--previous)", path,
        )
    if plans.keys:
        verify_signature(plans.keys, path, meta.content_hash, COORDINATOR)
    return reader


def _clip_factors(
    plans: Plans,
    robust: RobustSpec,
    updates: Sequence[ValidatedUpdate],
    out_dir: Path,
    previous_dir: str | Path | None,
    round_index: int,
    log: Callable[[str], None] | None,
) -> dict[str, _Clip]:
    """Per site: norm of its update delta (update − model it started from) and the clip scale.

    One streaming pass per update (and its previous model), a block at a time, before any
    arithmetic on the pools.
    """
    if robust.clip_norm is None:
        return {}
    folder = Path(previous_dir) if previous_dir is not None else previous_round_dir(out_dir, round_index)
    clips: dict[str, _Clip] = {}
    for update in updates:
        previous = open_previous_model(plans, update.site, folder, round_index - 1)
        sumsq = 0.0
        for name in update.reader.keys():
            info = previous.infos.get(name)
            if info is None or info.shape != update.reader.infos[name].shape:
                raise InputError(
                    f"lacks tensor {name!r} as site {update.site!r} sends it, so its update delta cannot be measured",
                    previous.path,
                )
            sumsq += delta_sumsq(update.reader.get_tensor(name), previous.get_tensor(name))
        norm = math.sqrt(sumsq)
        clips[update.site] = _Clip(previous, norm, clip_factor(norm, robust.clip_norm))
    scaled = {s: c for s, c in clips.items() if c.factor < 1.0}
    if scaled:
        _log(log, "clip_norm: scaled " + ", ".join(f"{s} (delta norm {c.delta_norm:.4g})" for s, c in sorted(scaled.items())))
    return clips


def _contribution_array(array: np.ndarray, clip: _Clip | None, name: str) -> np.ndarray | ClippedTensor:
    """The site's tensor as the combiner reads it: clipped lazily, block by block (O(model)
    memory over all sites, see ClippedTensor), or the memory-mapped tensor itself."""
    if clip is None or clip.factor == 1.0:
        return array
    return ClippedTensor(array, clip.previous.get_tensor(name), clip.factor)


def aggregate_round(
    plans: Plans,
    update_paths: Sequence[str | Path],
    out_dir: str | Path,
    expected_round: int | None = None,
    log: Callable[[str], None] | None = None,
    signing_key: SigningKey | None = None,
    previous_dir: str | Path | None = None,
    replace: bool = False,
    recovery: Sequence[str | Path] = (),
) -> AggregateReport:
    """Validate a round's updates, merge them by the plan's strategy and write the round folder.

    `signing_key`: the coordinator's key; required when the plan lists public keys (every
    output then gets a `.sig`). `previous_dir`: the round folder the sites started from, read
    only with `clip_norm` and DP accounting (default: `round_<r-1>` beside `out_dir`).
    `recovery`: survivors' seed files for sites that dropped out under secure aggregation.

    The round folder's outputs are committed together (fedseg.federation.round_commit), under
    its lock. A complete round aggregated from the same updates is returned as it is; one
    aggregated from other updates is refused unless `replace`, which replaces it as a whole.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, update_paths)
    with folder_lock(out_dir, "round folder"):
        return _aggregate_locked(
            plans, update_paths, out_dir, expected_round, log, signing_key, previous_dir, replace, recovery
        )


def _aggregate_locked(
    plans: Plans,
    update_paths: Sequence[str | Path],
    out_dir: Path,
    expected_round: int | None,
    log: Callable[[str], None] | None,
    signing_key: SigningKey | None,
    previous_dir: str | Path | None,
    replace: bool,
    recovery: Sequence[str | Path],
) -> AggregateReport:
    strategy = get_strategy(plans.strategy.name)
    strategy.check_params(plans.strategy.params)
    robust = parse_robust(plans.strategy.params)
    signing_key = require_signing_key(plans.keys, signing_key, COORDINATOR)
    updates = validate_updates(plans, update_paths, expected_round=expected_round, strategy=strategy)
    round_index = updates[0].meta.round
    by_site = {u.site: u for u in updates}
    validation = validation_summary(round_index, {u.site: u.meta.extra for u in updates}, [u.path for u in updates])
    _log(log, f"round {round_index}: {len(updates)} update(s) valid ({', '.join(sorted(by_site))})")
    missing_sites = check_quorum(plans, by_site, round_index)   # too few: refused before anything is written
    # secure aggregation next: a late file from a site whose masks were recovered is refused
    # as such, even over the complete round it was left out of
    private = prepare_private_round(
        plans, strategy, updates, out_dir, Path(previous_dir or previous_round_dir(out_dir, round_index)), recovery, log,
    )
    existing = _existing_round(plans, updates, out_dir, round_index, replace, log)
    if existing is not None:
        return existing
    clip = _clip_factors(plans, robust, updates, out_dir, previous_dir, round_index, log)

    routing = _routing(strategy, plans)
    # (pool, key) -> [(site, name)] over the sites that sent an update, sorted by site
    members: dict[tuple[str, str], list[tuple[str, str]]] = {}
    key_meta: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}
    for site in sorted(by_site):
        for name, (pool, key, shape, dtype) in routing[site].items():
            members.setdefault((pool, key), []).append((site, name))
            previous = key_meta.setdefault((pool, key), (shape, dtype))
            if previous != (shape, dtype):
                raise ValueError(f"strategy maps tensors of different shape/dtype to {pool}/{key}")

    results: dict[tuple[str, str], CombineResult] = {}
    pool_models: dict[tuple[str, str], np.ndarray] = {}
    weights: dict[str, dict[str, float] | None] = {}
    readers = {site: u.reader for site, u in by_site.items()}
    # one (pool, key) at a time, from the mappings that were validated: one tensor per site in memory
    for (pool, key) in sorted(members):
        shape, dtype = key_meta[(pool, key)]
        contributions = [
            Contribution(
                site, by_site[site].meta.n_cases, by_site[site].meta.n_iterations,
                _contribution_array(readers[site].get_tensor(name), clip.get(site), name),
            )
            for site, name in members[(pool, key)]
        ]
        if pool not in weights:
            weights[pool] = strategy.pool_weights(plans, pool, contributions)
        if private is not None:   # secure aggregation (masked sum) and/or DP (noised sum)
            combined = private.combine(pool, key, contributions)
        elif robust.replaces_combine:
            if weights[pool] is None:
                raise InputError(
                    f"robust={plans.strategy.params.get('robust')} replaces weighted-mean pools, but strategy "
                    f"{strategy.name!r} merges pool {pool!r} by its own rule; drop `robust` from the plan"
                )
            combined = robust_combine(robust, [c.array for c in contributions])
        else:
            combined = strategy.combine(plans, pool, key, contributions)
        model = strategy.pool_model(plans, pool, key, contributions, combined)
        if isinstance(combined, dict):
            results[(pool, key)] = {s: _cast(a, shape, dtype, pool, key) for s, a in combined.items()}
        else:
            results[(pool, key)] = _cast(combined, shape, dtype, pool, key)
        if model is not None:
            if model is combined:  # the shared result itself: reuse the cast array, no copy
                pool_models[(pool, key)] = results[(pool, key)]
            else:
                pool_models[(pool, key)] = _cast(model, shape, dtype, pool, key)

    # -- write: pool models, per-site files, then the report (the commit record), all staged ---
    with staged_round(out_dir) as stage:
        outputs: list[OutputRecord] = []
        model_pools = strategy.model_pools(plans)
        stems = [pool_filename(p) for p in model_pools]
        if len(set(stems)) != len(stems):
            raise ValueError(f"model pools {model_pools} map to clashing file names")
        pool_files: dict[str, tuple[dict[str, np.ndarray], OutputRecord]] = {}
        hashes: dict[str, str] = {}     # output path -> content hash (to sign linked copies)
        for pool, stem in zip(model_pools, stems):
            tensors = {key: arr for (p, key), arr in sorted(pool_models.items()) if p == pool}
            sites = sorted({s for (p, _k), ms in members.items() if p == pool for s, _n in ms})
            meta = WeightMeta(
                kind="model",
                plan_id=plans.plan_id,
                strategy=plans.strategy.name,
                site=pool,
                round=round_index,
                n_cases=sum(by_site[s].meta.n_cases for s in sites),
                n_iterations=sum(by_site[s].meta.n_iterations for s in sites),
                scopes={key: pool for key in tensors},
                extra={"sites": sites},
            )
            record = _write(stage.root, f"{MODELS_DIR}/{stem}.safetensors", "pool", pool, tensors, meta, signing_key, hashes)
            pool_files[pool] = (tensors, record)
            outputs.append(record)
        for site in sorted(plans.sites):
            rel = f"{site}.safetensors"
            tensors, scopes = _site_tensors(strategy, plans, site, results, pool_models)
            same_as = _identical_pool_file(tensors, scopes, pool_files)
            if same_as is not None:
                # The site loads exactly a pool model (fedavg: every site loads the global model):
                # link to that file instead of writing the same bytes once per site.
                _link_or_copy(stage.path(same_as.path), stage.path(rel))
                if signing_key is not None:
                    write_signature(stage.path(rel), signing_key, hashes[same_as.path], same_as.sha256)
                outputs.append(dataclasses.replace(same_as, path=rel, kind="site", name=site, same_as=same_as.path))
                continue
            update = by_site.get(site)
            meta = WeightMeta(
                kind="model",
                plan_id=plans.plan_id,
                strategy=plans.strategy.name,
                site=site,
                round=round_index,
                n_cases=update.meta.n_cases if update else plans.sites[site].n_cases,
                n_iterations=update.meta.n_iterations if update else 0,
                scopes=scopes,
                extra={"participated": update is not None},
            )
            outputs.append(_write(stage.root, rel, "site", site, tensors, meta, signing_key, hashes))

        report = AggregateReport(
            round=round_index,
            plan_id=plans.plan_id,
            strategy=plans.strategy.name,
            inputs=[_input_record(u, clip.get(u.site)) for u in updates],
            weights={p: (None if robust.replaces_combine else w) for p, w in weights.items()},
            outputs=outputs,
            missing_sites=missing_sites,
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
    _log(log, quorum_note(missing_sites, round_index))
    _log(log, f"round {round_index}: wrote {len(outputs)} weight file(s) and {REPORT_FILE} to {out_dir}")
    update_best(out_dir.parent, report.validation, log)
    return report


def _existing_round(
    plans: Plans,
    updates: Sequence[ValidatedUpdate],
    out_dir: Path,
    round_index: int,
    replace: bool,
    log: Callable[[str], None] | None,
) -> AggregateReport | None:
    """The round already in `out_dir` when it was made from exactly these updates (idempotent
    re-run); None when the round is to be written; InputError when it would be replaced
    without `replace`, or the folder belongs to another round."""
    check_round_number(out_dir, round_index, REPORT_FILE)
    if finish_commit(out_dir):
        _log(log, f"round {round_index}: finished the commit an interrupted run left in {out_dir}")
    found = read_record(out_dir)
    if found is None:
        return None
    record = found[1]
    try:
        same = record["plan_id"] == plans.plan_id and (
            sorted((i["site"], i["sha256"]) for i in record["inputs"]) == sorted((u.site, u.sha256) for u in updates)
        )
    except (KeyError, TypeError):
        same = False
    damaged = damaged_files(out_dir, record)
    if same and not damaged:
        try:
            report = AggregateReport.from_dict(record)
        except (KeyError, TypeError):
            report = None   # a record edited by hand: the round is written again
        if report is not None:
            _log(log, f"round {round_index}: {out_dir} already holds this round from the same updates; nothing to do")
            return report
        damaged = [REPORT_FILE]
    if same:
        _log(log, f"round {round_index}: rewriting {len(damaged)} damaged output(s) ({', '.join(damaged[:3])})")
        return None
    if not replace:
        raise InputError(
            f"already holds round {round_index}, aggregated from other updates; pass --replace to replace the "
            "round as a whole (the sites that loaded it must then train it again)",
            out_dir / REPORT_FILE,
        )
    _log(log, f"round {round_index}: replacing the round in {out_dir} (--replace)")
    return None


def _cast(array: Any, shape: tuple[int, ...], dtype: str, pool: str, key: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"strategy returned shape {array.shape} for {pool}/{key}, expected {shape}")
    return np.asarray(array, dtype=np.dtype(dtype), order="C")


def _site_tensors(
    strategy: Strategy,
    plans: Plans,
    site: str,
    results: Mapping[tuple[str, str], CombineResult],
    pool_models: Mapping[tuple[str, str], np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What `site` loads next: its result from each pool it loads from.

    A personalised result without an entry for this site (it sent no update) falls back to
    the pool model; a key nobody contributed to this round is left out, and the site keeps
    its own tensor for it (see compose_site_state).
    """
    tensors: dict[str, np.ndarray] = {}
    scopes: dict[str, str] = {}
    for name, (_shape, dtype) in expected_parameters(plans, site).items():
        source = resolved_loads(strategy, plans, site, name, dtype)
        if source is None or source not in results:
            continue
        result = results[source]
        if isinstance(result, dict):
            array = result.get(site, pool_models.get(source))
        else:
            array = result
        if array is not None:
            tensors[name] = array
            scopes[name] = source[0]
    return tensors, scopes


def _write(
    out_dir: Path, rel: str, kind: str, name: str, tensors: dict[str, np.ndarray], meta: WeightMeta,
    signing_key: SigningKey | None = None, hashes: dict[str, str] | None = None,
) -> OutputRecord:
    path = path_inside(out_dir, *rel.split("/"))
    written, digest = write_weight_file_digest(path, tensors, meta)
    if signing_key is not None:
        write_signature(path, signing_key, written.content_hash, digest)
    if hashes is not None:
        hashes[rel] = written.content_hash
    return OutputRecord(path=rel, kind=kind, name=name, n_tensors=len(tensors), bytes=path.stat().st_size, sha256=digest)


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
    """Atomically make `target` a hard link to `source` (a copy where links are not supported)."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


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


def _input_record(update: ValidatedUpdate, clip: _Clip | None = None) -> InputRecord:
    return InputRecord(
        delta_norm=clip.delta_norm if clip is not None else None,
        clip_factor=clip.factor if clip is not None else None,
        site=update.site,
        path=str(update.path),
        sha256=update.sha256,
        bytes=update.n_bytes,
        n_cases=update.meta.n_cases,
        n_iterations=update.meta.n_iterations,
        update_norm=update.update_norm if math.isfinite(update.update_norm) else None,
        extra=update.meta.extra,
    )


# ---------------------------------------------------------------------------------------
# round 0
# ---------------------------------------------------------------------------------------
def initial_round(
    plans: Plans, out_dir: str | Path, seed: int | None = None, signing_key: SigningKey | None = None,
    replace: bool = False,
    start_state: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """Write round_000: `<site>.safetensors` (the FULL initial state, local tensors included,
    so a site can start without building anything), `models/<pool>.safetensors` and the
    commit record `init.json`. Signed with the coordinator's `signing_key` (required when the
    plan lists public keys).

    One network per configuration, built with the seed; every tensor of a (pool, key) is then
    taken from the first site (in name order) that holds it, so all sites of a pool start
    from bit-identical shared weights even when their configurations differ.

    `start_state` (e.g. a pretrained nnU-Net model, fedseg.federation.nnunet_import) replaces
    the seeded weights; it must hold exactly the network's tensors with their shapes.

    Like `aggregate_round`: committed as a whole under the folder's lock; a complete round 0
    of the same plan, seed and starting weights is left as it is, another one is refused
    unless `replace`.
    """
    out_dir = Path(out_dir)
    seed = plans.seed if seed is None else int(seed)
    check_output_folder(out_dir)
    start = None if start_state is None else _start_digest(start_state)
    with folder_lock(out_dir, "round folder"):
        return _initial_locked(plans, out_dir, seed, signing_key, replace, start_state, start)


def _start_digest(start_state: Mapping[str, np.ndarray]) -> str:
    """sha256 over the starting weights (names, shapes, dtypes, bytes): round 0's record says
    which start it was built from, so another start is not mistaken for the same round."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(start_state):
        array = np.ascontiguousarray(start_state[name])
        digest.update(f"{name}|{array.shape}|{array.dtype.name}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _existing_initial_round(plans: Plans, out_dir: Path, seed: int, replace: bool, start: str | None) -> list[Path] | None:
    check_round_number(out_dir, 0, INIT_RECORD)
    finish_commit(out_dir)
    found = read_record(out_dir)
    if found is None:
        return None
    record = found[1]
    if record.get("plan_id") == plans.plan_id and record.get("seed") == seed and record.get("start") == start:
        if not damaged_files(out_dir, record):
            return [out_dir / rel for rel in record_files(record) if rel.endswith(".safetensors")]
        return None   # the same round 0, damaged: written again (the same bytes, from the seed)
    if not replace:
        raise InputError(
            f"already holds a round 0 of another plan, seed or start (plan_id {str(record.get('plan_id'))[:12]}…, seed "
            f"{record.get('seed')}); pass --replace to replace it, or choose a new folder",
            out_dir / INIT_RECORD,
        )
    return None


def _initial_locked(
    plans: Plans, out_dir: Path, seed: int, signing_key: SigningKey | None, replace: bool,
    start_state: Mapping[str, np.ndarray] | None, start: str | None,
) -> list[Path]:
    import torch

    existing = _existing_initial_round(plans, out_dir, seed, replace, start)
    if existing is not None:
        return existing
    strategy = get_strategy(plans.strategy.name)
    strategy.check_params(plans.strategy.params)
    signing_key = require_signing_key(plans.keys, signing_key, COORDINATOR)
    manifests = plans.extra.get("manifests") or {}
    built: dict[str, dict[str, np.ndarray]] = {}
    states: dict[str, dict[str, np.ndarray]] = {}
    for site in sorted(plans.sites):
        config = plans.sites[site].configuration or plans.default_configuration
        if config not in built:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                network = strategy.network(plans, site)
            state = {k: v.detach().cpu().numpy().copy() for k, v in network.state_dict().items()}
            if start_state is not None:
                state = _pretrained_state(state, start_state)
            if config in manifests:
                expected = expected_parameters(plans, site)
                got = {k: (tuple(v.shape), v.dtype.name) for k, v in state.items()}
                if got != expected:
                    raise InputError(
                        f"the network built for configuration {config!r} does not match the plan's manifest "
                        f"(differs at {describe(set(got) ^ set(expected) or {k for k in got if got[k] != expected.get(k)})}); "
                        "re-run `fedseg plan`"
                    )
            built[config] = state
        states[site] = dict(built[config])
    states = strategy.initial_states(plans, states)

    pooled: dict[tuple[str, str], np.ndarray] = {}
    scopes: dict[str, dict[str, str]] = {}
    for site in sorted(plans.sites):
        scopes[site] = {}
        for name, array in states[site].items():
            pool = resolved_scope(strategy, plans, site, name, array.dtype.name)
            if pool is None:
                continue
            key = (pool, strategy.key(plans, site, name))
            first = pooled.setdefault(key, array)
            if first.shape != array.shape or first.dtype != array.dtype:
                raise ValueError(f"strategy maps tensors of different shape/dtype to {key[0]}/{key[1]}")
            states[site][name] = first
            scopes[site][name] = pool

    written: list[str] = []
    with staged_round(out_dir) as stage:
        for site in sorted(plans.sites):
            meta = WeightMeta(
                kind="model", plan_id=plans.plan_id, strategy=plans.strategy.name, site=site, round=0,
                n_cases=plans.sites[site].n_cases, n_iterations=0, scopes=scopes[site], extra={"seed": seed},
            )
            written.append(f"{site}.safetensors")
            _write_signed(stage.path(written[-1]), states[site], meta, signing_key)
        for pool in strategy.model_pools(plans):
            tensors = {key: arr for (p, key), arr in pooled.items() if p == pool}
            meta = WeightMeta(
                kind="model", plan_id=plans.plan_id, strategy=plans.strategy.name, site=pool, round=0,
                n_cases=0, n_iterations=0, scopes={k: pool for k in tensors}, extra={"seed": seed},
            )
            written.append(f"{MODELS_DIR}/{pool_filename(pool)}.safetensors")
            _write_signed(stage.path(written[-1]), tensors, meta, signing_key)
        record = {"round": 0, "plan_id": plans.plan_id, "strategy": plans.strategy.name, "seed": seed}
        if start is not None:
            record["start"] = start   # sha256 of the starting weights (e.g. an nnU-Net checkpoint)
        stage.commit(INIT_RECORD, record)
    return [out_dir / rel for rel in written]


def _pretrained_state(built: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`start` in the built network's tensor order and dtypes; any name or shape difference is refused."""
    if set(built) != set(start):
        raise InputError(f"the starting weights do not match the plan's network (differs at {describe(set(built) ^ set(start))})")
    out = {}
    for name, array in built.items():
        given = np.asarray(start[name])
        if given.shape != array.shape:
            raise InputError(f"starting weight {name!r} is {list(given.shape)}, the plan's network has {list(array.shape)}")
        out[name] = given.astype(array.dtype, copy=True)
    return out


def _write_signed(path: Path, tensors: Mapping[str, Any], meta: WeightMeta, signing_key: SigningKey | None) -> WeightMeta:
    """Write a weight file and, with a key, its `.sig` (signing the digest computed while writing)."""
    written, digest = write_weight_file_digest(path, tensors, meta)
    if signing_key is not None:
        write_signature(path, signing_key, written.content_hash, digest)
    return written


# ---------------------------------------------------------------------------------------
# site side
# ---------------------------------------------------------------------------------------
def split_site_state(plans: Plans, site: str, state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(shared, local): shared = what the site sends (non-None scope), local = what stays."""
    strategy = get_strategy(plans.strategy.name)
    shared: dict[str, np.ndarray] = {}
    local: dict[str, np.ndarray] = {}
    for name, value in state.items():
        array = to_numpy(value)
        target = shared if resolved_scope(strategy, plans, site, name, array.dtype.name) is not None else local
        target[name] = array
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
    """Write the update of `site` for `round_index`: only its shared tensors, with their scopes.

    With `signing_key` (the site's own), `<path>.sig` is written too. With `privacy` (plans
    with secure_aggregation / dp.*), the tensors are clipped, noised and masked first."""
    strategy = get_strategy(plans.strategy.name)
    shared, _local = split_site_state(plans, site, state)
    scopes = {name: resolved_scope(strategy, plans, site, name, a.dtype.name) for name, a in shared.items()}
    n_cases = plans.sites[site].n_cases if n_cases is None else int(n_cases)
    if privacy is not None:
        shared = privacy.protect(plans, strategy, site, shared, int(round_index), n_cases)
    meta = WeightMeta(
        kind="update", plan_id=plans.plan_id, strategy=plans.strategy.name, site=site, round=int(round_index),
        n_cases=n_cases, n_iterations=int(n_iterations),
        scopes={k: v for k, v in scopes.items() if v is not None}, extra=dict(extra or {}),
    )
    return _write_signed(Path(path), shared, meta, signing_key)

"""The coordinator's aggregation: validated updates in, next round's weight files out.

The plan's route table says where each tensor goes; the strategy's rule says how a pool is
merged; this module does the rest, the same way for every strategy:

- validate every input (`fedseg.federation.validation`): the cheap checks first, then the data
  pass of every file in a thread while this one merges; on any fault nothing is written;
- stream key by key over the memory-mapped updates: each (pool, key) is merged from one
  tensor per contributing site in float64 and cast back to the manifest dtype once, so memory
  is O(model), not O(sites x model) (a personal pool holds one result per member, which is
  inherent to personalisation);
- write `<site>.safetensors` for every site of the plan, `models/<pool>.safetensors` and
  `aggregate.json` (fedseg.federation.round_outputs), staged and committed together under the
  round folder's lock (fedseg.federation.round_commit), so a round is the old one or the new
  one, never a mix. A round folder is complete when aggregate.json exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.errors import InputError
from fedseg.federation.aggregate_records import REPORT_FILE, AggregateReport, is_recorded_input
from fedseg.federation.best_round import validation_summary
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.privacy import PrivateRound, prepare_private_round
from fedseg.federation.privacy_params import parse_privacy
from fedseg.federation.quorum import check_quorum
from fedseg.federation.robust import RobustSpec, parse_robust, robust_combine
from fedseg.federation.round_commit import check_output_folder, check_round_number, damaged_files, finish_commit, read_record
from fedseg.federation.round_outputs import MergedRound, write_round
from fedseg.federation.routes import RouteTable, route_table
from fedseg.federation.signing import COORDINATOR, SigningKey, require_signing_key
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.base import CombineResult, Contribution, Strategy
from fedseg.federation.update_clipping import Clip, clip_factors, contribution_array, previous_round_dir
from fedseg.federation.validation import PendingValidation, ValidatedUpdate, start_validation
from fedseg.folder_lock import folder_lock

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


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
        request = _Request(plans, out_dir, log, previous_dir, replace, recovery)
        return _aggregate_locked(request, update_paths, expected_round, signing_key)


@dataclass
class _Request:
    plans: Plans
    out_dir: Path
    log: Callable[[str], None] | None
    previous_dir: str | Path | None
    replace: bool
    recovery: Sequence[str | Path]

    def say(self, message: str | None) -> None:
        if self.log is not None and message is not None:
            self.log(message)


def _aggregate_locked(
    request: _Request, update_paths: Sequence[str | Path], expected_round: int | None, signing_key: SigningKey | None,
) -> AggregateReport:
    plans = request.plans
    strategy = get_strategy(plans.strategy.name)
    strategy.check_params(plans.strategy.params)
    signing_key = require_signing_key(plans.keys, signing_key, COORDINATOR)
    plan_id = plans.plan_id   # a hash of the whole plan: computed once for the round
    # The data pass (content hash, finite values, norm) of the files runs in one thread while
    # this one merges them, both key by key: the two use two cores where there are two. Nothing
    # leaves before the pass has passed every file (the outputs are staged and committed at
    # the end), and a failure meanwhile reports the first bad file, if any, instead.
    pending = start_validation(plans, update_paths, expected_round=expected_round, plan_id=plan_id, workers=1)
    # numpy's warnings meanwhile (inf − inf from a file about to be refused) are shown only
    # once every file passed: a refused round prints its one-line error alone
    with warnings.catch_warnings(record=True) as held:
        try:
            outcome = _merge_round(request, pending, strategy, plan_id)
        except Exception:
            pending.wait()   # InputError for the first bad file, if any: the fault to report
            raise
        updates = pending.wait()
    for caught in held:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    request.say(f"round {updates[0].meta.round}: {len(updates)} update(s) valid ({', '.join(sorted(u.site for u in updates))})")
    if isinstance(outcome, AggregateReport):   # the folder already holds this round
        return outcome
    return write_round(
        plans, request.out_dir, outcome.merged, updates, outcome.clips, outcome.missing_sites, outcome.validation,
        outcome.robust, outcome.private, signing_key, request.log,
    )


@dataclass
class _MergedInputs:
    """A merged round with what its record states about the inputs."""

    merged: MergedRound
    clips: dict[str, Clip]
    missing_sites: list[str]
    validation: dict[str, Any] | None
    robust: RobustSpec
    private: PrivateRound | None


def _merge_round(
    request: _Request, pending: PendingValidation, strategy: Strategy, plan_id: str,
) -> _MergedInputs | AggregateReport:
    """The round merged from the updates (their data possibly still being checked), or the
    record of the same round already in the folder."""
    plans, out_dir = request.plans, request.out_dir
    robust = parse_robust(plans.strategy.params)
    updates = pending.updates
    round_index = updates[0].meta.round
    by_site = {u.site: u for u in updates}
    validation = validation_summary(round_index, {u.site: u.meta.extra for u in updates}, [u.path for u in updates])
    missing_sites = check_quorum(plans, by_site, round_index)   # too few: refused before anything is written
    if parse_privacy(plans.strategy.params).active:
        pending.wait()   # a private round records its dropouts before the merge: from checked files only
    # secure aggregation next: a late file from a site whose masks were recovered is refused
    # as such, even over the complete round it was left out of
    previous = Path(request.previous_dir or previous_round_dir(out_dir, round_index))
    private = prepare_private_round(plans, strategy, updates, out_dir, previous, request.recovery, request.log)
    existing = _existing_round(request, updates, round_index)
    if existing is not None:
        return existing
    clips = clip_factors(plans, robust, updates, out_dir, request.previous_dir, round_index, request.log)
    merged = _merge(plans, plan_id, strategy, route_table(plans), by_site, clips, robust, private)
    return _MergedInputs(merged, clips, missing_sites, validation, robust, private)


def _merge(
    plans: Plans,
    plan_id: str,
    strategy: Strategy,
    table: RouteTable,
    by_site: dict[str, ValidatedUpdate],
    clips: dict[str, Clip],
    robust: RobustSpec,
    private: PrivateRound | None,
) -> MergedRound:
    """Every (pool, key) merged from the sites that sent an update, one key at a time from the
    validated mappings: one tensor per site in memory."""
    merged = MergedRound(round_index=next(iter(by_site.values())).meta.round, by_site=by_site, plan_id=plan_id)
    manifests = {site: expected_parameters(plans, site) for site in by_site}
    for (pool, key), senders in sorted(table.members().items()):
        present = [(site, name) for site, name in senders if site in by_site]
        if not present:
            continue
        merged.members[(pool, key)] = present
        first_site, first_name = present[0]
        shape, dtype = manifests[first_site][first_name]
        contributions = [
            Contribution(site, by_site[site].meta.n_cases, by_site[site].meta.n_iterations,
                         contribution_array(by_site[site].reader.get_tensor(name), clips.get(site), name))
            for site, name in present
        ]
        if pool not in merged.weights:
            merged.weights[pool] = strategy.pool_weights(plans, pool, contributions)
        combined = _combine(plans, strategy, robust, private, merged.weights[pool], pool, key, contributions)
        merged.add(pool, key, combined, strategy.pool_model(plans, pool, key, contributions, combined), shape, dtype)
    return merged


def _combine(
    plans: Plans,
    strategy: Strategy,
    robust: RobustSpec,
    private: PrivateRound | None,
    weights: dict[str, float] | None,
    pool: str,
    key: str,
    contributions: list[Contribution],
) -> CombineResult:
    if private is not None:   # secure aggregation (masked sum) and/or DP (noised sum)
        return private.combine(pool, key, contributions)
    if robust.replaces_combine:
        if weights is None:
            raise InputError(
                f"robust={plans.strategy.params.get('robust')} replaces weighted-mean pools, but strategy "
                f"{strategy.name!r} merges pool {pool!r} by its own rule; drop `robust` from the plan"
            )
        return robust_combine(robust, [c.array for c in contributions])
    return strategy.combine(plans, pool, key, contributions)


def _existing_round(request: _Request, updates: Sequence[ValidatedUpdate], round_index: int) -> AggregateReport | None:
    """The round already in the folder when it was made from exactly these updates (idempotent
    re-run); None when the round is to be written; InputError when it would be replaced
    without `replace`, or the folder belongs to another round."""
    out_dir = request.out_dir
    check_round_number(out_dir, round_index, REPORT_FILE)
    if finish_commit(out_dir):
        request.say(f"round {round_index}: finished the commit an interrupted run left in {out_dir}")
    found = read_record(out_dir)
    if found is None:
        return None
    record = found[1]
    same = _same_inputs(record, request.plans, updates)
    damaged = damaged_files(out_dir, record)
    if same and not damaged:
        report = _stored_report(record)
        if report is not None:
            request.say(f"round {round_index}: {out_dir} already holds this round from the same updates; nothing to do")
            return report
        damaged = [REPORT_FILE]
    if same:
        request.say(f"round {round_index}: rewriting {len(damaged)} damaged output(s) ({', '.join(damaged[:3])})")
        return None
    if not request.replace:
        raise InputError(
            f"already holds round {round_index}, aggregated from other updates; pass --replace to replace the "
            "round as a whole (the sites that loaded it must then train it again)",
            out_dir / REPORT_FILE,
        )
    request.say(f"round {round_index}: replacing the round in {out_dir} (--replace)")
    return None


def _same_inputs(record: dict[str, Any], plans: Plans, updates: Sequence[ValidatedUpdate]) -> bool:
    """Whether `record` was aggregated from exactly `updates` (one input per site, each named by
    its content hash, or by the sha256 of its bytes in a record written before)."""
    try:
        recorded = {item["site"]: item for item in record["inputs"]}
        return (
            record["plan_id"] == plans.plan_id
            and len(recorded) == len(record["inputs"]) and set(recorded) == {u.site for u in updates}
            and all(is_recorded_input(recorded[u.site], u.content_hash, u.bytes_sha256) for u in updates)
        )
    except (KeyError, TypeError, AttributeError):
        return False


def _stored_report(record: dict[str, Any]) -> AggregateReport | None:
    try:
        return AggregateReport.from_dict(record)
    except (KeyError, TypeError):
        return None   # a record edited by hand: the round is written again

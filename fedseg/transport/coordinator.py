"""The coordinator's side of a Flower federation, written as a file-based run would be.

The coordinator keeps the run folder of `fedseg simulate` (ARCHITECTURE.md §6): plans.json,
fingerprints/, round_000/, round_r/updates/<site>.safetensors, round_r/<site>.safetensors,
round_r/models/, round_r/aggregate.json, report/. Updates that arrive in Flower messages are
written to round_r/updates/ byte for byte as each arrives (the coordinator holds one at a time)
and merged by `aggregation.aggregate_round`, the same call as `fedseg aggregate`: the strategy code and every check (hash, plan, round, signature,
shapes, finite values) are shared. A round whose aggregate.json exists is complete, so a
coordinator started again on the same folder skips it: Flower runs get fedseg's resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.atomic import write_json_atomic
from fedseg.errors import InputError
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.run_folder import round_dir
from fedseg.federation.run_setup import plan_and_init
from fedseg.federation.run_status import SITE_FAILURES_FILE
from fedseg.federation.run_summary import collect_traffic, collect_val_dice, write_report
from fedseg.federation.signing import load_public_keys, load_signing_key
from fedseg.federation.strategies import DEFAULT_STRATEGY
from fedseg.federation.single_machine import SimulationResult
from fedseg.federation.weightfile import open_weight_file
from fedseg.names import check_site_name, path_inside
from fedseg.planning.fingerprint_file import load_fingerprint, save_fingerprint
from fedseg.training.evaluation import save_metrics
from fedseg.transport.payload import read_weight_bundle, write_weight_bundle

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.federation.aggregate_records import AggregateReport
    from fedseg.planning.plans import Plans


@dataclass
class CoordinatorSettings:
    """What `fedseg simulate` takes, minus the sites (they answer over the network)."""

    run_dir: Path
    strategy: str = DEFAULT_STRATEGY
    rounds: int = 3
    configuration: str = "3d_fullres"
    iterations: int | None = None          # per site per round (default: the plan's)
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 1234
    keys: Path | None = None               # folder of <name>.pub: the plan then requires signatures
    key: Path | None = None                # the coordinator's private key (with keys)
    round_timeout: float | None = None     # seconds a round waits for the sites' updates (None: no limit)
    budget: float | None = None            # planning budget (nnU-Net GB-equivalents; default the planner's)


class Coordinator:
    """Plan, hand out models, aggregate and report, on the run folder."""

    def __init__(self, settings: CoordinatorSettings, log: Callable[[str], None] = lambda message: None) -> None:
        self.settings = settings
        self.run_dir = Path(settings.run_dir)
        self.log = log
        self.plans: Plans | None = None
        self._signing_key = None
        if settings.key is not None:
            self._signing_key = load_signing_key(settings.key)

    # -- planning --------------------------------------------------------------------------
    def plan(self, fingerprints: Mapping[str, dict[str, Any]]) -> Plans:
        """Store each site's fingerprint, plan (or check the stored plan on resume), write round_000."""
        loaded = []
        for site in sorted(fingerprints):
            # the name comes from a remote node: it must be a site name before it names a file
            check_site_name(site, what="site name sent by a node")
            path = path_inside(self.run_dir / "fingerprints", f"{site}.json")
            save_fingerprint(fingerprints[site], path)
            fingerprint = load_fingerprint(path)         # validates what the site sent
            if fingerprint.get("site") not in (None, site):
                raise InputError(f"site {site!r} sent the fingerprint of site {fingerprint.get('site')!r}", path)
            loaded.append(fingerprint)
        keys = None
        if self.settings.keys is not None:
            keys = load_public_keys(self.settings.keys)
        s = self.settings
        self.plans = plan_and_init(
            self.run_dir, loaded, strategy=s.strategy, rounds=s.rounds, configuration=s.configuration,
            iterations=s.iterations, overrides=s.overrides, seed=s.seed, log=self.log, keys=keys,
            signing_key=self._signing_key, budget=s.budget,
        )
        return self.plans

    def _require_plans(self) -> Plans:
        if self.plans is None:
            raise RuntimeError("Coordinator.plan() must run first")
        return self.plans

    @property
    def plans_json(self) -> str:
        return (self.run_dir / "plans.json").read_text()

    # -- rounds ------------------------------------------------------------------------------
    def pending_rounds(self) -> list[int]:
        """Rounds without aggregate.json; complete rounds are reported and skipped."""
        pending = []
        for r in range(1, self._require_plans().training.rounds + 1):
            if (round_dir(self.run_dir, r) / "aggregate.json").is_file():
                self.log(f"round {r}: already complete, skipped")
            else:
                pending.append(r)
        return pending

    def model_for(self, site: str, round_index: int) -> dict[str, bytes]:
        """The bundle `site` trains round `round_index` from: round_<r-1>/<site>.safetensors (+ .sig)."""
        return read_weight_bundle(round_dir(self.run_dir, round_index - 1) / f"{site}.safetensors")

    def final_model_for(self, site: str) -> dict[str, bytes]:
        return self.model_for(site, self._require_plans().training.rounds + 1)

    def receive_update(self, round_index: int, site: str, bundle: Mapping[str, bytes]) -> Path:
        """Write `site`'s update as it arrives, to round_r/updates/<site>.safetensors (+ .sig).

        Written at once, so the coordinator holds one update in memory at a time, not the
        round's N: its memory does not grow with the number of sites (the round is aggregated
        from the files, as `fedseg aggregate` does). Until aggregate.json exists the round is
        pending: `fedseg status` lists the updates already in, a resumed run replaces them.
        """
        self._require_plans()
        path = write_weight_bundle(bundle, round_dir(self.run_dir, round_index) / "updates" / f"{site}.safetensors",
                                   f"site {site!r}")
        with open_weight_file(path) as reader:
            if reader.meta.site != site:
                raise InputError(f"the node of site {site!r} sent an update of site {reader.meta.site!r}", path)
        return path

    def aggregate(self, round_index: int, updates: Mapping[str, Path],
                  failures: Mapping[str, str] | None = None) -> AggregateReport:
        """Aggregate the received updates (site -> file from `receive_update`) as `fedseg aggregate` does.

        `failures` (site -> reason: failed or timed out) are recorded in round_r/site_failures.json
        first, so a round refused for lack of quorum still says why the sites are missing.
        """
        plans = self._require_plans()
        rdir = round_dir(self.run_dir, round_index)
        self.record_failures(round_index, failures or {})
        paths = [updates[site] for site in sorted(updates)]
        return aggregate_round(plans, paths, rdir, expected_round=round_index, log=self.log, signing_key=self._signing_key)

    def record_failures(self, round_index: int, failures: Mapping[str, str]) -> None:
        """round_r/site_failures.json: why sites are missing from a round (nothing when none is)."""
        if failures:
            write_json_atomic(round_dir(self.run_dir, round_index) / SITE_FAILURES_FILE, dict(sorted(failures.items())))

    # -- report ------------------------------------------------------------------------------
    def finish(self, sites: list[str], test_metrics: Mapping[str, dict]) -> SimulationResult:
        """report/: per-site test metrics (computed at the sites), validation Dice per round, traffic."""
        plans = self._require_plans()
        rounds = plans.training.rounds
        for site, result in sorted(test_metrics.items()):
            save_metrics(result, self.run_dir / "report" / f"metrics_{site}.json")
        val_dice: dict[str, list[float | None]] = {site: [] for site in sorted(sites)}
        for r in range(1, rounds + 1):
            collect_val_dice(round_dir(self.run_dir, r), val_dice)
        traffic = collect_traffic(self.run_dir, rounds, sorted(sites))
        report_dir = write_report(self.run_dir, plans.plan_id, val_dice, dict(test_metrics), plans.labels, traffic=traffic)
        return SimulationResult(
            str(self.run_dir), plans.plan_id, rounds, val_dice, dict(test_metrics), str(report_dir), traffic=traffic
        )

"""Secure aggregation and differential privacy in a round: the plan check, the site's side and
the coordinator's side. The mechanisms are in `secure_aggregation` and `dp`; this module only
wires them to plans, pools and update files, so the engine and the site need one call each.

Both work for every pool that is a weighted sum Σ a_k w_k / Σ a_k (`Strategy.sum_weight`):
fedavg, fedsam/fedmsa, asymfedavg, mixmfl's encoder/decoder pools. A rule that needs the
individual updates (FLAMES' personalised mixture, mixmfl's prototype memory, robust
median/trimmed mean, coordinator-side clip_norm and max_update_norm) is refused at plan time.

Weights: a_k is the strategy's weight for the site (n_cases or 1). With DP it is divided by the
largest planned weight in the pool, so a_k ≤ 1 and one site moves the weighted sum by at most
C: the noise σC on the sum is then calibrated to the sum's sensitivity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import InputError
from fedseg.federation import dp as dp_mod
from fedseg.federation import secure_aggregation as sa
from fedseg.federation.privacy_params import PrivacySpec, parse_privacy
from fedseg.federation.robust import parse_robust
from fedseg.federation.routes import route_table
from fedseg.federation.signing import PRIVATE_SUFFIX, generate_key
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.base import Contribution, Strategy, weighted_mean

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.federation.validation import ValidatedUpdate
    from fedseg.planning.plans import Plans

REPORT_FIELD = "privacy"          # the key of the privacy record in aggregate.json


# ---------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------
PoolKey = tuple[str, str]


def key_members(plans: Plans) -> dict[PoolKey, list[str]]:
    """(pool, key) -> sorted plan sites that send a tensor to it (masks and noise shares are
    per pool key: with asymfedavg, not every site of a pool holds every key)."""
    members = route_table(plans).members()
    return {pk: sorted({site for site, _name in sent}) for pk, sent in sorted(members.items())}


def check_privacy_plan(plans: Plans, strategy: Strategy, keys: bool = True) -> PrivacySpec:
    """Refuse a plan whose privacy options cannot hold (one-line InputError); returns the spec.
    `keys`: also check that every site's key-agreement key is in the plan."""
    params = plans.strategy.params
    spec = parse_privacy(params)
    if not spec.active:
        return spec
    what = "secure_aggregation=true" if spec.secure_aggregation else "differential privacy (dp.*)"
    robust = parse_robust(params)
    if robust.replaces_combine:
        raise InputError(f"{what} cannot be combined with robust={params.get('robust')}: a median or trimmed mean needs each site's update")
    if spec.secure_aggregation:
        for key in ("clip_norm", "max_update_norm"):
            if params.get(key) is not None:
                raise InputError(
                    f"secure_aggregation=true cannot be combined with {key}: the coordinator never sees a single update "
                    f"(use dp.clip: each site bounds its own update)"
                )
    members = key_members(plans)
    for (pool, key), sites in members.items():
        if any(strategy.sum_weight(plans, pool, plans.sites[s].n_cases) is None for s in sites):
            raise InputError(
                f"{what} needs pools that are weighted sums, but strategy {strategy.name!r} merges pool {pool!r} "
                f"by a rule that needs each site's update"
            )
        if spec.secure_aggregation and len(sites) < 2:
            raise InputError(
                f"secure_aggregation=true: {key!r} of pool {pool!r} comes from one site ({sites[0]}) only, so its sum "
                f"would be that site's update"
            )
    if spec.secure_aggregation and keys:
        missing = sorted(set(plans.sites) - set(sa.plan_public_keys(plans)))
        if missing:
            raise InputError(
                f"secure_aggregation=true needs every site's key-agreement public key in the plan (missing: "
                f"{', '.join(missing)}); plan with --keys DIR holding each site's .pub from `fedseg keygen`"
            )
    return spec


def attach_agreement_keys(plans: Plans, keys: Mapping[str, str]) -> None:
    """Record the sites' X25519 public keys and the fixed-point format in the plan (in place)."""
    plans.extra[sa.PLAN_KEY] = {
        "public_keys": dict(sorted(keys.items())), "modulus_bits": sa.MODULUS_BITS, "scale_bits": sa.SCALE_BITS,
    }


def wants_secure_aggregation(overrides: Mapping[str, Any] | None, params: Mapping[str, Any] | None = None) -> bool:
    """Whether plan parameters (or raw --set strings) ask for secure aggregation."""
    for source in (params or {}), (overrides or {}):
        for key in ("secure_aggregation", "strategy.secure_aggregation"):
            if str(source.get(key, "")).strip().lower() == "true" or source.get(key) is True:
                return True
    return False


def contribution_weights(
    plans: Plans, strategy: Strategy, spec: PrivacySpec, pool: str, members: Sequence[str], n_cases: Mapping[str, int]
) -> dict[str, float]:
    """a_k for each site in `n_cases`; `members`: the plan sites of the pool key (see the module note)."""
    """a_k for each site in `n_cases` (see the module note)."""
    weights = {site: float(strategy.sum_weight(plans, pool, n)) for site, n in n_cases.items()}
    if spec.dp is not None:
        top = max(float(strategy.sum_weight(plans, pool, plans.sites[s].n_cases)) for s in members)
        weights = {site: min(1.0, w / top) for site, w in weights.items()}
    return weights


# ---------------------------------------------------------------------------------------
# site
# ---------------------------------------------------------------------------------------
@dataclass
class SitePrivacy:
    """What a site needs to protect its update: the model it started from (DP) and its key (masks)."""

    start: dict[str, np.ndarray] | None = None
    agreement_key: sa.AgreementKey | None = None
    rng: np.random.Generator = field(default_factory=dp_mod.system_rng)

    def protect(
        self, plans: Plans, site: str, shared: Mapping[str, np.ndarray], round_index: int, n_cases: int
    ) -> dict[str, np.ndarray]:
        """The tensors the site really sends: clipped (DP), noised and masked (secure aggregation)."""
        spec = parse_privacy(plans.strategy.params)
        values: dict[str, np.ndarray] = {name: np.asarray(a) for name, a in shared.items()}
        if spec.dp is not None:
            if self.start is None:
                raise ValueError("differential privacy needs the model the site started the round from")
            values, _factor = dp_mod.clip_update(values, self.start, spec.dp.clip)
        if not spec.secure_aggregation:
            return {name: np.asarray(values[name], dtype=shared[name].dtype) for name in shared}
        key = sa.require_agreement_key(plans, self.agreement_key, site)
        strategy = get_strategy(plans.strategy.name)
        members = key_members(plans)
        routes = route_table(plans).sent(site)
        public = sa.plan_public_keys(plans)
        seeds: dict[tuple[str, str], bytes] = {}     # (pool, peer) -> seed
        out = {}
        for name, value in values.items():
            pool, pool_key = routes[name].pool, routes[name].key
            peers = [p for p in members[(pool, pool_key)] if p != site]
            for peer in peers:
                if (pool, peer) not in seeds:
                    seeds[(pool, peer)] = sa.pair_seed(key, peer, public[peer], plans.plan_id, round_index, pool)
            a = contribution_weights(plans, strategy, spec, pool, members[(pool, pool_key)], {site: n_cases})[site]
            weighted = a * np.asarray(value, dtype=np.float64)
            if spec.dp is not None:
                share_std = spec.dp.noise_multiplier * spec.dp.clip / math.sqrt(len(members[(pool, pool_key)]))
                weighted = weighted + dp_mod.gaussian(weighted.shape, share_std, self.rng)
            words = sa.encode(weighted, len(plans.sites), f"site {site!r} tensor {name!r}")
            out[name] = sa.apply_pair_masks(words, site, {p: seeds[(pool, p)] for p in peers}, pool_key)
        return out


def site_privacy(
    plans: Plans, site: str, start_shared: Mapping[str, Any] | None, agreement_key: sa.AgreementKey | None
) -> SitePrivacy | None:
    """None when the plan has no privacy option; checks the site's key before any training."""
    spec = parse_privacy(plans.strategy.params)
    if not spec.active:
        return None
    if spec.secure_aggregation:
        sa.require_agreement_key(plans, agreement_key, site)
    start = None
    if spec.dp is not None and start_shared is not None:
        start = {name: np.array(a, dtype=np.float64, copy=True) for name, a in start_shared.items()}
    return SitePrivacy(start=start, agreement_key=agreement_key)


# ---------------------------------------------------------------------------------------
# coordinator
# ---------------------------------------------------------------------------------------
def privacy_history(previous_dir: Path, round_index: int) -> list[float]:
    """Noise multipliers of rounds 1..round_index-1, from the previous round's aggregate.json."""
    if round_index <= 1:
        return []
    path = Path(previous_dir) / "aggregate.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        history = record[REPORT_FIELD]["dp"]["noise_multipliers"]
        if len(history) != round_index - 1 or not all(isinstance(s, (int, float)) for s in history):
            raise ValueError("wrong length")
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"cannot account for the privacy spent before round {round_index}: no DP record of rounds 1-{round_index - 1} "
            f"here (pass the previous round folder with --previous)", path,
        ) from None
    return [float(s) for s in history]


def budget_error(spec_dp: Any, round_index: int, value: float, spent: float) -> InputError:
    return InputError(
        f"dp.max_epsilon={spec_dp.max_epsilon:g}: round {round_index} would bring ε to {value:.3g} at δ={spec_dp.delta:g}; "
        f"the federation stops after round {round_index - 1} (ε {spent:.3g})"
    )


def check_budget_before_round(plans: Plans, previous_dir: Path, round_index: int) -> None:
    """Refuse to start `round_index` when even full participation would exceed dp.max_epsilon."""
    spec = parse_privacy(plans.strategy.params)
    if spec.dp is None or spec.dp.max_epsilon is None:
        return
    history = privacy_history(previous_dir, round_index)
    value = dp_mod.epsilon([*history, spec.dp.noise_multiplier], spec.dp.delta, spec.dp.accountant)
    if value > spec.dp.max_epsilon:
        raise budget_error(spec.dp, round_index, value, dp_mod.epsilon(history, spec.dp.delta, spec.dp.accountant))


@dataclass
class PrivateRound:
    """The coordinator's privacy work in one round; `combine` replaces the strategy's pool merge."""

    plans: Plans
    strategy: Strategy
    spec: PrivacySpec
    members: dict[PoolKey, list[str]]
    n_cases: dict[str, int]                              # reporting site -> n_cases it declared
    recoveries: list[sa.Recovery] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    noise_multipliers: list[float] = field(default_factory=list)   # every round so far, this one last
    epsilon: float | None = None
    rng: np.random.Generator = field(default_factory=dp_mod.system_rng)

    def combine(self, pool: str, key: str, contributions: Sequence[Contribution]) -> np.ndarray:
        """The pool's weighted mean for `key`: unmasked (secure aggregation) and noised (DP)."""
        reporters = {c.site: self.n_cases[c.site] for c in contributions}
        weights = contribution_weights(self.plans, self.strategy, self.spec, pool, self.members[(pool, key)], reporters)
        total = sum(weights.values())
        if self.spec.secure_aggregation:
            acc = np.zeros(contributions[0].array.size, dtype=np.uint64)
            for c in contributions:
                acc += np.asarray(c.array, dtype=np.uint64).reshape(-1)
            self._remove_dropped_masks(acc, pool, key)
            return (sa.decode(acc) / total).reshape(contributions[0].array.shape)
        mean = weighted_mean(contributions, [weights[c.site] for c in contributions])
        if self.spec.dp is not None:
            mean = mean + dp_mod.gaussian(mean.shape, self.spec.dp.noise_multiplier * self.spec.dp.clip / total, self.rng)
        return mean

    def _remove_dropped_masks(self, acc: np.ndarray, pool: str, key: str) -> None:
        sites = self.members[(pool, key)]
        for dropped in (d for d in self.dropped if d in sites):
            for recovery in (r for r in self.recoveries if r.site in sites):
                seed = recovery.seeds[pool][dropped]
                words = sa.mask(seed, key, acc.size)
                # the survivor added +m when its name sorts first, −m otherwise: undo it
                if recovery.site < dropped:
                    acc -= words
                else:
                    acc += words

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"secure_aggregation": None, "dp": None}
        if self.spec.secure_aggregation:
            out["secure_aggregation"] = {
                "modulus_bits": sa.MODULUS_BITS, "scale_bits": sa.SCALE_BITS, "dropped": list(self.dropped),
                "recovered_by": sorted(r.site for r in self.recoveries),
            }
        if self.spec.dp is not None:
            out["dp"] = {
                **self.spec.dp.to_dict(), "noise_added_by": "sites" if self.spec.secure_aggregation else "coordinator",
                "round_noise_multiplier": self.noise_multipliers[-1], "noise_multipliers": list(self.noise_multipliers),
                "epsilon": self.epsilon, "rounds": len(self.noise_multipliers),
            }
        return out


def prepare_private_round(
    plans: Plans,
    strategy: Strategy,
    updates: Sequence[ValidatedUpdate],
    out_dir: Path,
    previous_dir: Path,
    recovery_paths: Sequence[str | Path] = (),
    log: Callable[[str], None] | None = None,
) -> PrivateRound | None:
    """Everything checked before any arithmetic: dropouts and their recovery, the privacy budget.

    None when the plan has no privacy option. The dropout record is written here, before any
    output: once the survivors' seeds are read, the dropped site's update must never be.
    """
    spec = check_privacy_plan(plans, strategy)
    if not spec.active:
        if recovery_paths:
            raise InputError("recovery files are only for plans with secure_aggregation=true")
        return None
    round_index = updates[0].meta.round
    members = key_members(plans)
    private = PrivateRound(plans, strategy, spec, members, {u.site: u.meta.n_cases for u in updates})
    if spec.secure_aggregation:
        _check_dropouts(private, updates, out_dir, round_index, recovery_paths)
    elif recovery_paths:
        raise InputError("recovery files are only for plans with secure_aggregation=true")
    if spec.dp is not None:
        history = privacy_history(previous_dir, round_index)
        sigma = spec.dp.noise_multiplier
        if spec.secure_aggregation:   # the dropped sites' noise shares are missing from the sum
            sigma *= min(math.sqrt(sum(s in private.n_cases for s in sites) / len(sites)) for sites in members.values())
        private.noise_multipliers = [*history, sigma]
        private.epsilon = dp_mod.epsilon(private.noise_multipliers, spec.dp.delta, spec.dp.accountant)
        if spec.dp.max_epsilon is not None and private.epsilon > spec.dp.max_epsilon:
            raise budget_error(spec.dp, round_index, private.epsilon, dp_mod.epsilon(history, spec.dp.delta, spec.dp.accountant))
        if log is not None:
            log(f"round {round_index}: ε = {private.epsilon:.3g} at δ = {spec.dp.delta:g} ({spec.dp.accountant}, σ {sigma:.3g})")
    if private.dropped:
        sa.write_dropout_record(out_dir, round_index, private.dropped, private.recoveries)
    return private


def _check_dropouts(
    private: PrivateRound, updates: Sequence[ValidatedUpdate], out_dir: Path, round_index: int, recovery_paths: Sequence[str | Path]
) -> None:
    recoveries = [sa.read_recovery(p, private.plans.plan_id, round_index) for p in recovery_paths]
    revealed = set(sa.recovered_sites(out_dir)) | {d for r in recoveries for by_site in r.seeds.values() for d in by_site}
    for update in updates:
        if update.site in revealed:
            raise InputError(
                f"comes from site {update.site!r}, whose masks for round {round_index} were recovered from the other "
                f"sites' seeds; refused, because with those seeds this update would be readable", update.path,
            )
    reporting = set(private.n_cases)
    dropped = sorted({s for sites in private.members.values() for s in sites} - reporting)
    by_survivor = {}
    for recovery in recoveries:
        if recovery.site not in reporting:
            raise InputError(f"comes from site {recovery.site!r}, which sent no update this round", recovery.path)
        by_survivor[recovery.site] = recovery
    for (pool, _key), sites in private.members.items():
        for gone in (s for s in sites if s not in reporting):
            for survivor in (s for s in sites if s in reporting):
                recovery = by_survivor.get(survivor)
                if recovery is None or gone not in recovery.seeds.get(pool, {}):
                    raise InputError(
                        f"secure aggregation: site {gone!r} sent no update for round {round_index}, and its masks are in "
                        f"the other sites' updates; site {survivor!r} must reveal its seeds with it "
                        f"(fedseg reveal-seeds --site {survivor} --dropped {gone} ...) and aggregate needs that file (--recovery)"
                    )
    private.dropped = dropped
    private.recoveries = [by_survivor[s] for s in sorted(by_survivor)]


def reveal_seeds(plans: Plans, key: sa.AgreementKey, round_index: int, dropped: Sequence[str], out: str | Path) -> Path:
    """A survivor's recovery file for the sites that dropped out of `round_index` (see secure_aggregation)."""
    if not parse_privacy(plans.strategy.params).secure_aggregation:
        raise InputError("the plan does not use secure aggregation, so there are no seeds to reveal")
    pools: dict[str, set[str]] = {}
    for (pool, _key), sites in key_members(plans).items():
        pools.setdefault(pool, set()).update(sites)
    return sa.write_recovery(plans, key, round_index, dropped, {p: sorted(s) for p, s in pools.items()}, out)


def plan_privacy(plans: Plans, strategy: Strategy, keys_folder: str | Path | None = None) -> Plans:
    """At plan time, after the manifests: record the sites' key-agreement keys (secure
    aggregation, from `keys_folder`'s <site>.pub files) and refuse impossible combinations."""
    check_privacy_plan(plans, strategy, keys=False)   # an impossible combination first, keys second
    if parse_privacy(plans.strategy.params).secure_aggregation:
        if keys_folder is None:
            raise InputError("secure_aggregation=true needs --keys DIR holding every site's .pub from `fedseg keygen`")
        attach_agreement_keys(plans, sa.load_agreement_public_keys(keys_folder, sorted(plans.sites)))
    check_privacy_plan(plans, strategy)
    return plans


def ensure_site_keys(folder: Path, sites: Sequence[str]) -> Path:
    """Key pairs for every site under `folder` (made once, reused on resume): for `simulate`."""
    for site in sorted(sites):
        if not (Path(folder) / f"{site}{PRIVATE_SUFFIX}").is_file():
            generate_key(site, folder)
    return Path(folder)

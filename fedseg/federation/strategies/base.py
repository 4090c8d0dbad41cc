"""The strategy interface: what a federated algorithm says; the engine does everything else.

A strategy answers, without doing any I/O:
1. `network(plans, site)`     the model a site trains (torch is imported lazily);
2. `scope(plans, site, name)` the pool a parameter is averaged in ("global", "group:MRI", ...)
                              or None (never leaves the site);
   `key(plans, site, name)`   the name the parameter has inside its pool (identity by default;
                              asymmetric networks map e.g. each site's decoder stages counted
                              from the bottleneck to one shared key);
3. `combine(plans, pool, key, contributions)` how a pool's contributions to one key are
                              merged: one array for every site of the pool, or one array per
                              site (personalised); `pool_model(...)` what the pool's own model
                              file holds for that key (e.g. a plain group mean).
`model_pools(plans)` names the pools written as `models/<pool file name>.safetensors`.

The engine streams key by key over memory-mapped files, so `combine` sees one tensor per
contributing site for ONE key at a time; it should accumulate in float64 and return float64
(the engine casts back to the manifest dtype). Integer tensors (num_batches_tracked, ...) are
never averaged: `resolved_scope` forces their scope to None whatever the strategy says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.privacy_params import PRIVACY_PARAMS, parse_privacy
from fedseg.federation.quorum import QUORUM_PARAMS, parse_min_sites
from fedseg.federation.robust import ROBUST_PARAMS, parse_robust

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fedseg.planning.plans import Plans

# Engine-level parameters every strategy accepts in plans.strategy.params
# (robust / clip_norm: fedseg.federation.robust; secure_aggregation / dp.*: fedseg.federation.privacy_params;
# min_sites: fedseg.federation.quorum).
ENGINE_PARAMS: frozenset[str] = frozenset({"max_update_norm"}) | ROBUST_PARAMS | PRIVACY_PARAMS | QUORUM_PARAMS


@dataclass(frozen=True)
class Contribution:
    """One site's tensor for one pool key (read-only, usually memory-mapped).

    With `clip_norm`, `array` is a ClippedTensor (fedseg.federation.robust): read it in
    blocks (`.reshape(-1)[a:b]`, as weighted_mean does) or through np.asarray.
    """

    site: str
    n_cases: int
    n_iterations: int
    array: np.ndarray


CombineResult = Union[np.ndarray, dict[str, np.ndarray]]


class Strategy:
    """Base class with the common defaults; subclasses set `name` and override what differs."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # params this strategy understands besides its engine params (checked by `check_params`)
    known_params: ClassVar[frozenset[str]] = frozenset()
    # whether its model recipe trains region-based labels (sigmoid per region, fedseg.data.labels)
    supports_regions: ClassVar[bool] = True
    # engine params (robust, clip_norm, max_update_norm) that mean something for this strategy
    engine_params: ClassVar[frozenset[str]] = ENGINE_PARAMS
    # Robust rules that keep the strategy's meaning: "median" and "trimmed" replace the weighted
    # mean of every pool, "clip_norm" shortens long update deltas. A strategy whose pools are not
    # plain weighted means narrows this and says why in `robust_refusal`.
    robust_rules: ClassVar[frozenset[str]] = frozenset({"median", "trimmed", "clip_norm"})
    robust_refusal: ClassVar[str] = ""
    # Names of the registered strategies that read a parameter key, for the refusal of a key given
    # to the wrong strategy. Installed by the registry (fedseg.federation.strategies), which
    # imports every strategy and so cannot be imported by this module that they all import.
    param_owners: ClassVar[Callable[[str], list[str]]] = staticmethod(lambda key: [])

    # -- configuration -------------------------------------------------------------------
    def param_names(self) -> frozenset[str]:
        """Every strategy parameter key this strategy reads from plans.strategy.params."""
        return self.engine_params | self.known_params

    def knows_param(self, key: str) -> bool:
        return key in self.param_names()

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Refuse unknown or invalid strategy params (a typo in `--set` must not pass silently)
        and robust rules that would change what the strategy means.

        Called when the plan is made, at round 0, at every aggregation and before a site
        trains: all of them refuse exactly the same plans.
        """
        unknown = sorted(set(params) - self.param_names())
        if unknown:
            raise InputError(self.unknown_param_message(unknown[0]))
        for key, value in sorted(params.items()):
            # no parameter means anything as infinity or NaN (`--set x=1e400` parses as infinity)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"--set {key} must be a finite number, not {value!r}")
        bound = params.get("max_update_norm")
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                  or not 0 < bound < math.inf):
            raise InputError(f"--set max_update_norm must be a positive number, not {bound!r}")
        spec = parse_robust(params)
        in_use = {spec.rule: f"robust={params.get('robust')}"} if spec.replaces_combine else {}
        if spec.clip_norm is not None:
            in_use["clip_norm"] = f"clip_norm={params.get('clip_norm')}"
        refused = [setting for rule, setting in sorted(in_use.items()) if rule not in self.robust_rules]
        if refused:
            raise InputError(
                f"--set {refused[0]} is refused under strategy {self.name!r}: {self.robust_refusal} "
                f"(robust rules it accepts: {', '.join(sorted(self.robust_rules)) or 'none'})"
            )
        parse_privacy(params)
        parse_min_sites(params)

    def unknown_param_message(self, key: str) -> str:
        """The refusal of an unknown key, naming the closest known key or the strategy that knows it."""
        from fedseg.planning.settings import PLAN_SETTINGS, unknown_key_message

        if key in ENGINE_PARAMS:
            return f"--set {key} has no effect under strategy {self.name!r}: {self.robust_refusal}"
        owners = [name for name in Strategy.param_owners(key) if name != self.name]
        if owners:
            return f"--set {key!r} is a parameter of strategy {', '.join(owners)}, not of {self.name!r}"
        return unknown_key_message(key, [*self.param_names(), *PLAN_SETTINGS], f"strategy {self.name!r}")

    def requires_same_channels(self, params: Mapping[str, Any]) -> bool:
        """Whether every site must hold the plan's channels (False: mix-modal sites hold subsets,
        laid out in the plan's channel order with absent channels zero; fedseg.data.channels)."""
        return True

    # -- 1. the network ------------------------------------------------------------------
    def network(self, plans: Plans, site: str) -> Any:
        """The torch module site `site` trains (default: the plain U-Net of its configuration).

        Seeded with plans.seed, so every site of a configuration builds bit-identical initial weights.
        """
        from fedseg.training.network import build_network

        return build_network(plans.configuration_for(site), plans.n_channels, plans.n_classes, seed=plans.seed)

    def trainer_class(self, plans: Plans) -> Any:
        """The SiteTrainer subclass a site trains with (torch imported lazily); default: SiteTrainer."""
        from fedseg.training.trainer import SiteTrainer

        return SiteTrainer

    def initial_states(self, plans: Plans, states: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Round-0 weights per site ({site: {name: array}}, each built from its configuration
        with the plan's seed), before pooled tensors are made identical; default: as built."""
        return states

    def planned_extra(self, plans: Plans) -> dict[str, Any]:
        """Strategy data decided at plan time, merged into plans.extra by `attach_manifests`
        once every configuration's manifest is known (e.g. asymfedavg's shared-parameter map)."""
        return {}

    # -- 2. where each parameter goes ------------------------------------------------------
    def scope(self, plans: Plans, site: str, name: str) -> str | None:
        raise NotImplementedError

    def key(self, plans: Plans, site: str, name: str) -> str:
        return name

    def loads(self, plans: Plans, site: str, name: str) -> tuple[str, str] | None:
        """(pool, key) from which `site` loads parameter `name` next round; default: where it sends it."""
        pool = self.scope(plans, site, name)
        return None if pool is None else (pool, self.key(plans, site, name))

    def model_pools(self, plans: Plans) -> list[str]:
        """Pools written as models/<pool_filename(pool)>.safetensors (the server-side models)."""
        return []

    # -- 3. how a pool is merged -----------------------------------------------------------
    def combine(self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution]) -> CombineResult:
        raise NotImplementedError

    def pool_model(
        self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution], combined: CombineResult
    ) -> np.ndarray | None:
        """The pool model's tensor for `key`: the combined array when there is one for all sites."""
        return combined if isinstance(combined, np.ndarray) else None

    def pool_weights(self, plans: Plans, pool: str, contributions: Sequence[Contribution]) -> dict[str, float] | None:
        """Weight of each site in the pool, for the round report (None when not a simple weighting)."""
        return None

    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float | None:
        """The unnormalised weight a_k of a site with `n_cases` when `combine` for `pool` is
        Σ a_k w_k / Σ a_k; None when the pool needs the individual updates. Secure aggregation
        and differential privacy work only on pools with a weight (fedseg.federation.privacy)."""
        return None


def resolved_scope(strategy: Strategy, plans: Plans, site: str, name: str, dtype: str) -> str | None:
    """The strategy's scope, except that non-float tensors never leave the site (not averageable)."""
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return None
    return strategy.scope(plans, site, name)


def resolved_loads(strategy: Strategy, plans: Plans, site: str, name: str, dtype: str) -> tuple[str, str] | None:
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return None
    return strategy.loads(plans, site, name)


def pool_filename(pool: str) -> str:
    """File stem of a pool model: "global" -> "global", "group:MRI" -> "MRI"."""
    stem = pool.split(":", 1)[1] if ":" in pool else pool
    if not stem or "/" in stem or "\\" in stem or stem in (".", ".."):
        raise ValueError(f"pool name {pool!r} cannot be used as a file name")
    return stem


# Elements per block when averaging: 64 Ki float64 = 512 KiB for the accumulator + the same
# for the scratch buffer stay in L2, so each input byte is read from memory exactly once.
_BLOCK = 1 << 16


def weighted_mean(contributions: Sequence[Contribution], weights: Sequence[float]) -> np.ndarray:
    """Σ w_k x_k / Σ w_k in float64 (Flower's `aggregate` with w_k = n_k, without float32 rounding)."""
    if not contributions:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("the weights sum to zero")
    shape = contributions[0].array.shape
    for contribution in contributions:
        if contribution.array.shape != shape:
            raise ValueError(f"contributions to one key differ in shape: {shape} vs {contribution.array.shape}")
    flats = [c.array.reshape(-1) for c in contributions]
    scales = [float(w) / total for w in weights]
    out = np.empty(flats[0].size, dtype=np.float64)
    scratch = np.empty(min(out.size, _BLOCK), dtype=np.float64)
    for start in range(0, out.size, _BLOCK):
        acc = out[start:start + _BLOCK]
        tmp = scratch[: acc.size]
        # multiply straight into float64 buffers: no float32 temporaries, no precision lost
        np.multiply(flats[0][start:start + _BLOCK], scales[0], out=acc, dtype=np.float64)
        for flat, scale in zip(flats[1:], scales[1:]):
            np.multiply(flat[start:start + _BLOCK], scale, out=tmp, dtype=np.float64)
            acc += tmp
    return out.reshape(shape)


def plain_mean(contributions: Sequence[Contribution]) -> np.ndarray:
    return weighted_mean(contributions, [1.0] * len(contributions))

"""The strategy interface: an aggregation rule (numpy only) that names its model recipe.

A strategy answers, without doing any I/O and without torch:
1. at plan time, `route(plans, manifests)`: for every site, which of its tensors are sent, to
   which pool ("global", "group:MRI", ...) and under which key in it (asymmetric networks map
   each site's stages to shared keys); which pools are written as model files; which pools are
   personal (every member loads its own mix). fedseg.federation.routes records the answer in
   plans.json; nothing asks the strategy again;
2. at round 0, `initial_states`: a change to the seeded weights (e.g. aligned initialisation);
3. at aggregation, `combine(plans, pool, key, contributions)`: how a pool's contributions to
   one key are merged: one array for every site of the pool, or one array per site
   (personal); `pool_model(...)` what the pool's model file holds for that key; `sum_weight`
   the site's weight a_k when the pool is a weighted sum (what secure aggregation and DP need).

The network a site trains and how it trains it are the model recipe named by `recipe`
(fedseg.training.recipes). The engine streams key by key over memory-mapped files, so
`combine` sees one tensor per contributing site for ONE key at a time; it should accumulate in
float64 and return float64 (the engine casts back to the manifest dtype), or that float64
result already cast to the contributions' dtype (the default weighted mean, block by block).
Integer tensors (num_batches_tracked, ...) are never routed, whatever the strategy says.
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
from fedseg.planning.settings import PLAN_SETTINGS, unknown_key_message
from fedseg.training.recipes.traits import recipe_traits
from fedseg.typed_params import param, param_keys, parse_params

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fedseg.planning.plans import Plans

GLOBAL_POOL = "global"

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
    # the aggregation rule's typed parameters (fedseg.typed_params), None: it reads none
    Params: ClassVar[type | None] = None
    # keys read besides Params', the engine's and the recipe's (checked by the subclass)
    known_params: ClassVar[frozenset[str]] = frozenset()
    # the model recipe its sites train (fedseg.training.recipes): network, trainer, their parameters
    recipe: ClassVar[str] = "unet"
    # whether every site trains a network planned from its own fingerprint (FednnU-Net)
    plans_per_site: ClassVar[bool] = False
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
        """Every strategy parameter key this strategy reads from plans.strategy.params: the
        engine's, its rule's and its model recipe's."""
        recipe_params = recipe_traits(self.recipe).params
        return (self.engine_params | self.known_params | (param_keys(self.Params) if self.Params else frozenset())
                | (param_keys(recipe_params) if recipe_params else frozenset()))

    def rule_params(self, plans: Plans) -> Any:
        """The rule's typed parameters as the plan sets them (None without `Params`)."""
        return parse_params(self.Params, plans.strategy.params) if self.Params else None

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
        if self.Params is not None:
            parse_params(self.Params, params)
        recipe_params = recipe_traits(self.recipe).params
        if recipe_params is not None:
            parse_params(recipe_params, params)

    def unknown_param_message(self, key: str) -> str:
        """The refusal of an unknown key, naming the closest known key or the strategy that knows it."""
        if key in ENGINE_PARAMS:
            return f"--set {key} has no effect under strategy {self.name!r}: {self.robust_refusal}"
        owners = [name for name in Strategy.param_owners(key) if name != self.name]
        if owners:
            return f"--set {key!r} is a parameter of strategy {', '.join(owners)}, not of {self.name!r}"
        return unknown_key_message(key, [*self.param_names(), *PLAN_SETTINGS], f"strategy {self.name!r}")

    def requires_same_channels(self, params: Mapping[str, Any]) -> bool:
        """Whether every site must hold the plan's channels (False: mix-modal sites hold subsets,
        laid out in the plan's channel order with absent channels zero; fedseg.data.channels);
        default: as the model recipe says."""
        return recipe_traits(self.recipe).requires_same_channels

    # -- plan time: where each tensor goes -------------------------------------------------
    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        """The pool and pool key of every tensor each site sends ({site: {name: (pool, key)}}),
        which pools are written as models, which are personal. Called once, by `fedseg plan`
        (fedseg.federation.routes.plan_routes), with every site's manifest; everything later
        reads the recorded table."""
        raise NotImplementedError

    def initial_states(self, plans: Plans, states: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        """Round-0 weights per site ({site: {name: array}}, each built from its configuration
        with the plan's seed), before pooled tensors are made identical; default: as built."""
        return states

    # -- aggregation: how a pool is merged ----------------------------------------------------
    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float | None:
        """The unnormalised weight a_k of a site with `n_cases` when the pool is merged as
        Σ a_k w_k / Σ a_k; None when the pool needs the individual updates. Secure aggregation
        and differential privacy work only on pools with a weight (fedseg.federation.privacy)."""
        return None

    def pool_weights(self, plans: Plans, pool: str, contributions: Sequence[Contribution]) -> dict[str, float] | None:
        """Weight of each site in the pool, for the round report (None when not a simple weighting)."""
        if self.sum_weight(plans, pool, 1) is None:
            return None   # the pool is not a weighted sum
        raw = [self.sum_weight(plans, pool, c.n_cases) for c in contributions]
        total = float(sum(raw))
        return {c.site: float(w) / total for c, w in zip(contributions, raw)}

    def combine(self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution]) -> CombineResult:
        """One array for every site of the pool, or {site: array} for a personal pool; default:
        the weighted mean by `sum_weight`."""
        weights = self.pool_weights(plans, pool, contributions)
        if weights is None:
            raise NotImplementedError(f"strategy {self.name!r} has no rule for pool {pool!r}")
        # cast to the stored dtype block by block (the result the engine would cast to it)
        return weighted_mean(contributions, [weights[c.site] for c in contributions], result_dtype(contributions))

    def pool_model(
        self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution], combined: CombineResult
    ) -> np.ndarray | None:
        """The pool model's tensor for `key`: the combined array when there is one for all sites."""
        return combined if isinstance(combined, np.ndarray) else None


Manifest = Mapping[str, tuple[tuple[int, ...], str]]   # {tensor name: (shape, dtype)}


@dataclass(frozen=True)
class ProposedRoutes:
    """A strategy's answer at plan time (fedseg.federation.routes records it in the plan)."""

    tensors: Mapping[str, Mapping[str, tuple[str, str]]]   # site -> {name: (pool, key)}; absent: stays local
    model_pools: frozenset[str] = frozenset()               # pools written as models/<pool>.safetensors
    personal: frozenset[str] = frozenset()                  # pools whose members each load their own mix


def every_tensor_to(manifests: Mapping[str, Manifest], pool_of: Callable[[str], str]) -> dict[str, dict[str, tuple[str, str]]]:
    """Route every tensor of every site to `pool_of(site)` under its own name."""
    return {site: {name: (pool_of(site), name) for name in manifest} for site, manifest in manifests.items()}


@dataclass(frozen=True)
class CaseWeighting:
    """How a weighted-mean pool weighs its sites: by case count (Flower's rule) or equally."""

    weighting: str = param("n_cases", choices=("n_cases", "uniform"))


@dataclass(frozen=True)
class MeanParams(CaseWeighting):
    """One global weighted mean; `missing=zero` admits sites holding subsets of the plan's
    channels (mix-modal MRI), the absent ones zero-filled."""

    missing: str | None = param(None, choices=("zero",))


def case_weight(weighting: CaseWeighting, n_cases: int) -> float:
    """A site's unnormalised FedAvg weight: its case count, or 1 with `weighting=uniform`."""
    return 1.0 if weighting.weighting == "uniform" else float(n_cases)


def pool_filename(pool: str) -> str:
    """File stem of a pool model: "global" -> "global", "group:MRI" -> "MRI"."""
    stem = pool.split(":", 1)[1] if ":" in pool else pool
    if not stem or "/" in stem or "\\" in stem or stem in (".", ".."):
        raise ValueError(f"pool name {pool!r} cannot be used as a file name")
    return stem


# Elements per block when averaging: 64 Ki float64 = 512 KiB for the accumulator + the same
# for the scratch buffer stay in L2, so each input byte is read from memory exactly once.
_BLOCK = 1 << 16


def weighted_mean(
    contributions: Sequence[Contribution], weights: Sequence[float], dtype: np.dtype | type = np.float64,
) -> np.ndarray:
    """Σ w_k x_k / Σ w_k in float64 (Flower's `aggregate` with w_k = n_k, without float32 rounding).

    `dtype`: the result's dtype. The sum is float64 either way; each block is cast to `dtype`
    once complete, so a float32 result is the float64 mean cast once, as the engine casts it,
    without the float64 copy of the whole key (twice the memory traffic of the float32 one).
    """
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
    size = flats[0].size
    out = np.empty(size, dtype=dtype)
    wide = out if out.dtype == np.float64 else np.empty(min(size, _BLOCK), dtype=np.float64)
    scratch = np.empty(min(size, _BLOCK), dtype=np.float64)
    for start in range(0, size, _BLOCK):
        acc = wide[start:start + _BLOCK] if wide is out else wide[: min(_BLOCK, size - start)]
        tmp = scratch[: acc.size]
        # multiply straight into float64 buffers: no float32 temporaries, no precision lost
        np.multiply(flats[0][start:start + _BLOCK], scales[0], out=acc, dtype=np.float64)
        for flat, scale in zip(flats[1:], scales[1:]):
            np.multiply(flat[start:start + _BLOCK], scale, out=tmp, dtype=np.float64)
            acc += tmp
        if wide is not out:
            out[start:start + acc.size] = acc   # the one rounding to `dtype`, while in cache
    return out.reshape(shape)


def result_dtype(contributions: Sequence[Contribution]) -> np.dtype:
    """The dtype a pool's merged key is stored in: the contributions' own when they share one
    float dtype (an update's tensors have the plan's dtypes: validation), float64 otherwise
    (the engine casts it to the plan's)."""
    dtypes = {np.dtype(c.array.dtype) for c in contributions}
    if len(dtypes) == 1 and np.issubdtype(next(iter(dtypes)), np.floating):
        return dtypes.pop()
    return np.dtype(np.float64)


def plain_mean(contributions: Sequence[Contribution]) -> np.ndarray:
    return weighted_mean(contributions, [1.0] * len(contributions))


class GlobalMean(Strategy):
    """One global model, the weighted mean of every tensor the recipe lets travel (FedAvg's
    rule; the base of FedAvg and of FedFMS, which pairs it with a SAM recipe)."""

    Params = MeanParams

    def requires_same_channels(self, params: Mapping[str, Any]) -> bool:
        # `missing=zero`: sites may hold different subsets of channels; the network sees the
        # plan's channels with the absent ones zero (the mix-modal FedAvg baseline).
        return params.get("missing") != "zero" and recipe_traits(self.recipe).requires_same_channels

    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        # a recipe's frozen backbone (fedmsa) is rebuilt by every site and never travels
        traits = recipe_traits(self.recipe)
        tensors = {site: {name: (GLOBAL_POOL, name) for name in manifest if not traits.stays_local(name)}
                   for site, manifest in manifests.items()}
        return ProposedRoutes(tensors, model_pools=frozenset({GLOBAL_POOL}))

    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float:
        return case_weight(self.rule_params(plans), n_cases)

"""FLAMES: one model per imaging modality, personalised aggregation inside each modality.

Sites are grouped by imaging modality (the plan's `SiteInfo.modality`, from the channel
names; `--set group.SITE=NAME` puts a site in another group). Every parameter of a site is
pooled in `group:<NAME>` only, so sites never mix weights with another modality. All groups
train networks of the same design (the plan's configuration).

Inside a group G, site i loads next round (FLAMES' reference aggregation)

    w_i' = α·w_i + (1 − α)·Σ_{j≠i} c_j·w_j,   c_j = n_j⁻¹ / Σ_{l≠i} n_l⁻¹,   α = 0.1 + 1/|G|

so each site keeps most of its own model and, among the others, the smaller sites weigh
more. n are the sites' case counts. |G| is the group's size in the plan (as the reference,
which counts the modality's registered clients). A site that is alone in its group, or the
only one of its group that sent an update this round, keeps its own weights: the reference
multiplies them by α = 1.1 each round, which makes them grow without bound.

The group's server model, `models/<NAME>.safetensors`, is the plain mean of the group's
updates; it is the model evaluated on server-side test sets (any organ of that modality).

Parameters (`fedseg plan --set KEY=VALUE`):
    alpha       "auto" (0.1 + 1/|G|) or a number in [0, 1]: the weight of the site's own model
    weighting   how the other sites' share (1 − α) is split: "inverse_n_cases" (FLAMES),
                "n_cases" (FedAvg-like) or "uniform"
    group.SITE  the group (model) of SITE instead of its modality
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import InputError
from fedseg.typed_params import param
from fedseg.federation.strategies.base import (
    CombineResult,
    Contribution,
    Manifest,
    ProposedRoutes,
    Strategy,
    every_tensor_to,
    plain_mean,
    weighted_mean,
)

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

GROUP_PREFIX = "group."
POOL_PREFIX = "group:"
WEIGHTINGS = ("inverse_n_cases", "n_cases", "uniform")
# α = ALPHA_BASE + 1/|G| (FLAMES' reference code): a site's own share shrinks as its group grows
# but always stays above a tenth more than an equal split.
ALPHA_BASE = 0.1


def _alpha_value(raw: Any) -> float | None:
    """None for "auto", else the number (InputError when it is neither)."""
    if raw is None or raw == "auto":
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0.0 <= float(raw) <= 1.0:
        raise InputError(f"alpha must be 'auto' or a number in [0, 1], got {raw!r}")
    return float(raw)


def _check_group_name(site: str, name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"group.{site} must be a non-empty group name, got {name!r}")
    name = name.strip()
    if "/" in name or "\\" in name or ":" in name or name in (".", ".."):
        raise InputError(f"group.{site}={name!r}: a group name is used as a file name (no '/', '\\', ':')")
    return name


def site_groups(plans: Plans) -> dict[str, str]:
    """site -> group name: the site's modality unless `group.SITE` says otherwise."""
    params = plans.strategy.params
    for key in params:
        if key.startswith(GROUP_PREFIX) and key[len(GROUP_PREFIX):] not in plans.sites:
            raise InputError(
                f"--set {key}: {key[len(GROUP_PREFIX):]!r} is not a site of the plan (sites: {', '.join(sorted(plans.sites))})"
            )
    groups = {}
    for site, info in sorted(plans.sites.items()):
        raw = params.get(GROUP_PREFIX + site, info.modality)
        groups[site] = _check_group_name(site, raw)
    return groups


def group_members(plans: Plans) -> dict[str, list[str]]:
    """group name -> its sites (sorted)."""
    members: dict[str, list[str]] = {}
    for site, group in site_groups(plans).items():
        members.setdefault(group, []).append(site)
    return members


def personalised_weights(
    site: str,
    n_cases: Mapping[str, float],
    group_size: int,
    alpha: float | None = None,
    weighting: str = "inverse_n_cases",
) -> dict[str, float]:
    """The weights of w_i' = α·w_i + (1 − α)·Σ_{j≠i} c_j·w_j for `site` (they sum to 1).

    `n_cases` holds the sites contributing this round (site included); `group_size` the
    group's planned size, which sets α = 0.1 + 1/|G| unless `alpha` is given. Alone (no other
    contributor) the site keeps its own weights: {site: 1}.
    """
    if site not in n_cases:
        raise ValueError(f"{site!r} is not among the contributors {sorted(n_cases)}")
    others = [s for s in sorted(n_cases) if s != site]
    if not others:
        return {site: 1.0}
    if weighting == "inverse_n_cases":
        # A site with no cases would get an infinite weight; the reference gives it none.
        raw = {s: (1.0 / n_cases[s] if n_cases[s] > 0 else 0.0) for s in others}
    elif weighting == "n_cases":
        raw = {s: float(n_cases[s]) for s in others}
    elif weighting == "uniform":
        raw = {s: 1.0 for s in others}
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    total = sum(raw.values())
    if not total > 0:
        return {site: 1.0}
    a = ALPHA_BASE + 1.0 / max(int(group_size), 1) if alpha is None else float(alpha)
    # With α from the formula a group of one would give α = 1.1; a group of one has no others,
    # so it never gets here. α ≤ 1 for every |G| ≥ 2.
    return {site: a, **{s: (1.0 - a) * raw[s] / total for s in others}}


@dataclass(frozen=True)
class FlamesParams:
    """How the other sites' share (1 − α) is split among them."""

    weighting: str = param("inverse_n_cases", choices=WEIGHTINGS)


class Flames(Strategy):
    name = "flames"
    description = "one model per imaging modality; personalised weights within a modality (FLAMES)"
    Params = FlamesParams
    known_params = frozenset({"alpha"})     # "auto" or a number: checked by `_alpha_value`
    # the plain U-Net trained with FLAMES' 0.3·Dice + 0.7·Focal loss (regions: not supported)
    recipe = "unet_dice_focal"

    # A coordinate median or trimmed mean of a group is one tensor for all its sites: every
    # site would load the same model, the opposite of FLAMES' personalised rule.
    robust_rules = frozenset({"clip_norm"})
    robust_refusal = "a median or trimmed mean gives every site of a group the same model, so FLAMES would stop being personal"

    # -- configuration -------------------------------------------------------------------
    def knows_param(self, key: str) -> bool:
        return key.startswith(GROUP_PREFIX) or super().knows_param(key)

    def check_params(self, params: Mapping[str, Any]) -> None:
        super().check_params({k: v for k, v in params.items() if not k.startswith(GROUP_PREFIX)})
        _alpha_value(params.get("alpha"))
        for key, value in params.items():
            if key.startswith(GROUP_PREFIX):
                _check_group_name(key[len(GROUP_PREFIX):], value)

    # -- where parameters go (plan time) --------------------------------------------------
    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        groups = site_groups(plans)
        pools = frozenset(POOL_PREFIX + group for group in groups.values())
        return ProposedRoutes(every_tensor_to(manifests, lambda site: POOL_PREFIX + groups[site]),
                              model_pools=pools, personal=pools)

    # -- how a group is merged -----------------------------------------------------------
    def _group_size(self, plans: Plans, pool: str) -> int:
        return len(group_members(plans).get(pool[len(POOL_PREFIX):], []))

    def site_weights(self, plans: Plans, pool: str, contributions: Sequence[Contribution]) -> dict[str, dict[str, float]]:
        """site -> {contributing site: weight} of each contributor's personalised model."""
        params = plans.strategy.params
        alpha = _alpha_value(params.get("alpha"))
        weighting = self.rule_params(plans).weighting
        n_cases = {c.site: float(c.n_cases) for c in contributions}
        size = self._group_size(plans, pool)
        return {c.site: personalised_weights(c.site, n_cases, size, alpha, weighting) for c in contributions}

    def combine(self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution]) -> CombineResult:
        by_site = {c.site: c for c in contributions}
        out: dict[str, np.ndarray] = {}
        for site, weights in self.site_weights(plans, pool, contributions).items():
            if weights == {site: 1.0}:
                out[site] = np.asarray(by_site[site].array, dtype=np.float64)   # kept as it is
            else:
                members = [by_site[s] for s in weights]
                out[site] = weighted_mean(members, [weights[s] for s in weights])
        return out

    def pool_model(
        self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution], combined: CombineResult
    ) -> np.ndarray:
        """The group's server model: the plain mean of the group's updates (FLAMES' server model)."""
        return plain_mean(contributions)

    def pool_weights(self, plans: Plans, pool: str, contributions: Sequence[Contribution]) -> dict[str, float]:
        """Weights of the server model (plain mean); the per-site weights go to the round report's log."""
        return {c.site: 1.0 / len(contributions) for c in contributions}


__all__ = ["Flames", "group_members", "personalised_weights", "site_groups"]

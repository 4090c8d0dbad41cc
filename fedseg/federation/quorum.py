"""Quorum: how many sites a round needs before the coordinator aggregates it.

A real federation loses sites (a hospital's machine is down, a node times out). The plan's
`min_sites` (`fedseg plan --set min_sites=N`; default: every site of the plan) says how many
updates a round needs:

- fewer than `min_sites` updates: the round is refused (exit 2 naming the missing sites),
  nothing is written, and the coordinator can wait for the late sites and aggregate again;
- at least `min_sites`: the round is aggregated from the updates there are; the missing
  sites are recorded in aggregate.json (`missing_sites`) and still get their
  `round_r/<site>.safetensors`, so a site that missed a round rejoins at the next one.

Only the count is a parameter: which sites are missing is always reported, never hidden.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fedseg.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

MIN_SITES = "min_sites"
QUORUM_PARAMS: frozenset[str] = frozenset({MIN_SITES})


def parse_min_sites(params: Mapping[str, Any]) -> int | None:
    """The plan's `min_sites` (None: not set, every site is needed); InputError when not a positive integer."""
    value = params.get(MIN_SITES)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"min_sites must be a positive integer, got {value!r}")
    return value


def required_sites(plans: Plans) -> int:
    """How many site updates a round of this plan needs."""
    value = parse_min_sites(plans.strategy.params)
    n_sites = len(plans.sites)
    if value is None:
        return n_sites
    if value > n_sites:
        raise InputError(f"min_sites={value} exceeds the plan's {n_sites} site(s) ({', '.join(sorted(plans.sites))})")
    return value


def check_quorum(plans: Plans, present: Iterable[str], round_index: int) -> list[str]:
    """The plan's sites missing from `present` (sorted); InputError when fewer than the quorum are present."""
    present = set(present)
    missing = sorted(set(plans.sites) - present)
    needed = required_sites(plans)
    if len(present) < needed:
        raise InputError(
            f"round {round_index}: {len(present)} of {len(plans.sites)} site update(s), the plan needs {needed} "
            f"(min_sites); missing: {', '.join(missing)}; nothing written"
        )
    return missing


def quorum_note(missing: list[str], round_index: int) -> str | None:
    """A console line naming the sites a quorate round went on without (None when none is missing)."""
    if not missing:
        return None
    return (
        f"round {round_index}: aggregated without {', '.join(missing)} (quorum held); "
        "they get this round's model and rejoin next round"
    )

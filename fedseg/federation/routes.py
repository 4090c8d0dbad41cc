"""The route table: where every tensor of every site goes, decided once, when the plan is made.

`fedseg plan` asks the strategy to route every site's tensors (`Strategy.route`, given the
parameter manifests) and records the answer in plans.json (`plans.extra["routes"]`):

    {"pools": {<pool>: {"members": [site, ...], "model": <file stem> | null, "result": "shared" | "personal"}},
     "sites": {<site>: {<tensor name>: [<pool>, <key in the pool>] | null}}}

Every tensor of every site's network has an entry: `null` stays at the site (in its state
folder, never in an update); `[pool, key]` is sent in the update and merged with the other
members' tensors of the same key. What a site loads back follows from its pool: "shared"
pools give every member the same merged tensor, "personal" pools (FLAMES) each member its
own mix. `model` names the pool model written as `round_r/models/<model>.safetensors`.

Round 0, training (what a site sends and keeps), validation of updates, aggregation, secure
aggregation and export only read this table: none of them asks the strategy again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.base import Strategy, pool_filename

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

ROUTES_KEY = "routes"
SHARED = "shared"        # every member of the pool loads the same merged tensor
PERSONAL = "personal"    # every member loads its own combination (e.g. FLAMES)
KEPT = "kept"            # in `routes_by_module`: tensors that stay at the site


@dataclass(frozen=True)
class Route:
    pool: str
    key: str


@dataclass(frozen=True)
class PoolInfo:
    members: tuple[str, ...]          # the sites that send tensors to the pool, sorted
    model: str | None                 # file stem of models/<model>.safetensors, or None (not written)
    result: str                       # SHARED or PERSONAL


@dataclass(frozen=True)
class RouteTable:
    """Read-only view of plans.extra["routes"]."""

    sites: Mapping[str, Mapping[str, Route | None]]
    pools: Mapping[str, PoolInfo]

    def sent(self, site: str) -> dict[str, Route]:
        """{tensor name: route} of what `site` sends (and loads back)."""
        return {name: route for name, route in self.sites[site].items() if route is not None}

    def pool_of(self, site: str, name: str) -> str | None:
        """The pool tensor `name` of `site` is sent to, None when it stays at the site."""
        route = self.sites[site][name]
        return None if route is None else route.pool

    def local(self, site: str) -> list[str]:
        """Names of the tensors that never leave `site`."""
        return [name for name, route in self.sites[site].items() if route is None]

    def members(self) -> dict[tuple[str, str], list[tuple[str, str]]]:
        """(pool, key) -> [(site, tensor name)] over every site of the plan, sorted by site."""
        out: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for site in sorted(self.sites):
            for name, route in self.sent(site).items():
                out.setdefault((route.pool, route.key), []).append((site, name))
        return out

    def model_pools(self) -> list[str]:
        """Pools written as models/<stem>.safetensors, in file-name order."""
        return sorted((p for p, info in self.pools.items() if info.model is not None), key=lambda p: self.pools[p].model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pools": {pool: {"members": list(info.members), "model": info.model, "result": info.result}
                      for pool, info in sorted(self.pools.items())},
            "sites": {site: {name: (None if r is None else [r.pool, r.key]) for name, r in entries.items()}
                      for site, entries in sorted(self.sites.items())},
        }

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> RouteTable:
        pools = {
            str(pool): PoolInfo(tuple(str(s) for s in info["members"]), None if info["model"] is None else str(info["model"]),
                                str(info["result"]))
            for pool, info in body["pools"].items()
        }
        sites = {
            str(site): {str(name): (None if entry is None else Route(str(entry[0]), str(entry[1])))
                        for name, entry in entries.items()}
            for site, entries in body["sites"].items()
        }
        return cls(sites=sites, pools=pools)


def route_table(plans: Plans) -> RouteTable:
    """The plan's route table; InputError when the plan has none or a malformed one."""
    body = plans.extra.get(ROUTES_KEY)
    if not isinstance(body, Mapping):
        raise InputError("the plan has no route table (re-run `fedseg plan` with this fedseg version)")
    try:
        table = RouteTable.from_dict(body)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise InputError("the plan's route table is malformed (re-run `fedseg plan`)") from None
    if set(table.sites) != set(plans.sites):
        raise InputError("the plan's route table does not list the plan's sites (re-run `fedseg plan`)")
    return table


def plan_routes(plans: Plans, strategy: Strategy) -> RouteTable:
    """Route every tensor of every site: the one place where the pool of a tensor is decided.

    The strategy routes what it shares (`Strategy.route`); integer tensors (num_batches_tracked,
    ...) never leave a site whatever it says, since they cannot be averaged. Checks that every
    (pool, key) holds tensors of one shape and dtype and that every pool the strategy writes
    as a model has a file name of its own.
    """
    manifests = {site: expected_parameters(plans, site) for site in sorted(plans.sites)}
    proposed = strategy.route(plans, manifests)
    sites: dict[str, dict[str, Route | None]] = {}
    for site, manifest in manifests.items():
        wanted = proposed.tensors.get(site, {})
        unknown = set(wanted) - set(manifest)
        if unknown:
            raise ValueError(f"strategy {strategy.name!r} routes tensors site {site!r} does not have: {sorted(unknown)[:3]}")
        sites[site] = {
            name: (Route(*wanted[name]) if name in wanted and _averageable(dtype) else None)
            for name, (_shape, dtype) in manifest.items()
        }
    _check_keys(sites, manifests)
    members: dict[str, set[str]] = {}
    for site, entries in sites.items():
        for route in entries.values():
            if route is not None:
                members.setdefault(route.pool, set()).add(site)
    pools = {pool: PoolInfo(tuple(sorted(sites_of)), pool_filename(pool) if pool in proposed.model_pools else None,
                            PERSONAL if pool in proposed.personal else SHARED)
             for pool, sites_of in sorted(members.items())}
    stems = [info.model for info in pools.values() if info.model is not None]
    if len(set(stems)) != len(stems):
        raise ValueError(f"model pools map to clashing file names: {sorted(stems)}")
    return RouteTable(sites=sites, pools=pools)


def _averageable(dtype: str) -> bool:
    return bool(np.issubdtype(np.dtype(dtype), np.floating))


def _check_keys(sites: Mapping[str, Mapping[str, Route | None]], manifests: Mapping[str, Mapping[str, tuple]]) -> None:
    seen: dict[tuple[str, str], tuple] = {}
    for site, entries in sites.items():
        for name, route in entries.items():
            if route is None:
                continue
            first = seen.setdefault((route.pool, route.key), manifests[site][name])
            if first != manifests[site][name]:
                raise ValueError(f"the strategy maps tensors of different shape/dtype to {route.pool}/{route.key}")



def summarise_routes(table: RouteTable) -> dict[str, str]:
    """Human-readable lines for `fedseg inspect plans.json`: one per pool (members, keys, model
    file, what its members load back) and one per site (tensors sent per pool, tensors kept)."""
    keys: dict[str, set[str]] = {}
    for (pool, key) in table.members():
        keys.setdefault(pool, set()).add(key)
    lines: dict[str, str] = {}
    for pool, info in sorted(table.pools.items()):
        model = f"models/{info.model}.safetensors" if info.model is not None else "no model file"
        lines[f"pool {pool}"] = (f"{len(keys.get(pool, ()))} keys from {', '.join(info.members)}; {model}; "
                                 f"{'each member loads its own mix' if info.result == PERSONAL else 'every member loads the merged tensor'}")
    for site in sorted(table.sites):
        per_pool: dict[str, int] = {}
        for route in table.sent(site).values():
            per_pool[route.pool] = per_pool.get(route.pool, 0) + 1
        sent = ", ".join(f"{n} to {pool}" for pool, n in sorted(per_pool.items())) or "nothing sent"
        lines[f"site {site}"] = f"{len(table.sites[site])} tensors: {sent}; {len(table.local(site))} kept local"
    return lines


def attach_routes(plans: Plans, strategy: Strategy | None = None) -> Plans:
    """A copy of `plans` (with its manifests) holding the route table of its strategy."""
    table = plan_routes(plans, strategy or get_strategy(plans.strategy.name))
    return dataclasses.replace(plans, extra={**plans.extra, ROUTES_KEY: table.to_dict()})


def routes_by_module(table: RouteTable) -> dict[str, dict[str, str]]:
    """{site: {module: where its tensors go}}: the table at the level of modules (the first three
    parts of a tensor name, e.g. `encoder.stages.0`), "kept" for tensors kept at the site."""
    out: dict[str, dict[str, str]] = {}
    for site, entries in sorted(table.sites.items()):
        modules: dict[str, list[str]] = {}
        for name, route in entries.items():
            module = ".".join(name.split(".")[:3])
            where = KEPT if route is None else route.pool
            if where not in modules.setdefault(module, []):
                modules[module].append(where)
        out[site] = {module: ", ".join(places) for module, places in modules.items()}
    return out

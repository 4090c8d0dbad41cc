"""The route table: decided once at plan time, recorded in plans.json, read by everything after."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_federation_engine import MANIFEST, make_plans  # noqa: E402

from fedseg.errors import InputError  # noqa: E402
from fedseg.federation.routes import (  # noqa: E402
    ROUTES_KEY,
    SHARED,
    Route,
    RouteTable,
    plan_routes,
    route_table,
    routes_by_module,
    summarise_routes,
)
from fedseg.federation.strategies.base import Manifest, ProposedRoutes, Strategy  # noqa: E402
from fedseg.planning.plans import load_plans  # noqa: E402


def test_every_tensor_of_every_site_has_an_entry_and_integers_stay() -> None:
    plans = make_plans()
    table = route_table(plans)
    for site in plans.sites:
        assert list(table.sites[site]) == list(MANIFEST)      # every tensor, in manifest order
        for name, entry in MANIFEST.items():
            expected = None if entry["dtype"] == "int64" else Route("global", name)
            assert table.sites[site][name] == expected, name
    assert table.pools["global"].members == tuple(sorted(plans.sites))
    assert table.pools["global"].model == "global" and table.pools["global"].result == SHARED
    assert RouteTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table   # what plans.json holds


def test_local_routes_nothing_and_writes_no_pool_model() -> None:
    table = route_table(make_plans("local"))
    assert table.pools == {} and table.model_pools() == []
    assert all(route is None for entries in table.sites.values() for route in entries.values())


class _Clash(Strategy):
    name = "clash"

    def route(self, plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        # two tensors of different shapes under one key: no merge could hold both
        first = next(iter(manifests))
        names = [n for n, (_shape, dtype) in manifests[first].items() if dtype == "float32"][:2]
        return ProposedRoutes({first: {name: ("global", "k") for name in names}})


def test_a_strategy_mapping_different_shapes_to_one_key_is_refused_at_plan_time() -> None:
    with pytest.raises(ValueError, match="different shape"):
        plan_routes(make_plans(), _Clash())


def test_a_plan_without_a_table_is_refused() -> None:
    plans = make_plans()
    bare = dataclasses.replace(plans, extra={k: v for k, v in plans.extra.items() if k != ROUTES_KEY})
    with pytest.raises(InputError, match="no route table"):
        route_table(bare)


def test_an_older_plans_file_is_refused_with_a_re_plan_message(tmp_path: Path) -> None:
    plans = make_plans()
    path = tmp_path / "plans.json"
    plans.save(path)
    body = json.loads(path.read_text())
    body["format_version"] = 1
    path.write_text(json.dumps(body))
    with pytest.raises(InputError, match="re-plan with `fedseg plan`") as caught:
        load_plans(path)
    assert "\n" not in str(caught.value) and "plans.json" in str(caught.value)


def test_inspect_lines_per_pool_site_and_module() -> None:
    table = route_table(make_plans())
    lines = summarise_routes(table)
    assert lines["pool global"].startswith("3 keys from A, B, C")
    assert lines["site A"] == "4 tensors: 3 to global; 1 kept local"
    modules = routes_by_module(table)
    assert set(modules) == {"A", "B", "C"} and "kept" in modules["A"]["norm.num_batches_tracked"]

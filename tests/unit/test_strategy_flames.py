"""FLAMES strategy: grouping by modality, the personalised rule against hand computations,
server models, and the engine's round folder for a plan with two modality groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg.errors import InputError
from fedseg.federation.routes import attach_routes
from fedseg.federation.routes import PERSONAL, Route, route_table
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.base import Contribution
from fedseg.federation.strategies.flames import group_members, personalised_weights, site_groups
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec


def make_plans(sites: dict[str, tuple[str, int]], params: dict | None = None, manifest: dict | None = None) -> Plans:
    network = NetworkSpec(2, [4, 8], [[3, 3], [3, 3]], [[1, 1], [2, 2]], [1, 1], [1])
    config = ConfigurationPlan("2d", [1.0, 1.0], [16, 16], [16.0, 16.0], 2, ["ZScoreNormalization"], [False], network)
    return attach_routes(Plans(
        dataset_name="t",
        channel_names={"0": "MRI"},
        labels={"background": 0, "lesion": 1},
        file_ending=".png",
        fingerprint={},
        sites={name: SiteInfo(modality=m, channels=[m], n_cases=n) for name, (m, n) in sites.items()},
        strategy=StrategySpec("flames", dict(params or {})),
        configurations={"2d": config},
        default_configuration="2d",
        extra={"manifests": {"2d": manifest or {"w": {"shape": [2], "dtype": "float32"}}}},
    ))


def contribution(site: str, n: int, values) -> Contribution:
    return Contribution(site, n, 10, np.asarray(values, dtype=np.float32))


SITES = {"a": ("MRI", 10), "b": ("MRI", 20), "c": ("MRI", 40), "u": ("US", 5), "v": ("US", 15), "x": ("CT", 7)}


# -- grouping -------------------------------------------------------------------------------
def test_sites_are_grouped_by_modality_and_group_override_moves_a_site():
    plans = make_plans(SITES)
    assert group_members(plans) == {"CT": ["x"], "MRI": ["a", "b", "c"], "US": ["u", "v"]}
    table = route_table(plans)
    assert table.sites["u"]["w"] == Route("group:US", "w")
    assert table.model_pools() == ["group:CT", "group:MRI", "group:US"]
    assert {pool: info.result for pool, info in table.pools.items()} == dict.fromkeys(table.model_pools(), PERSONAL)

    moved = make_plans(SITES, {"group.x": "US"})
    assert site_groups(moved)["x"] == "US"
    assert group_members(moved)["US"] == ["u", "v", "x"]


def test_bad_params_are_refused():
    strategy = get_strategy("flames")
    with pytest.raises(InputError, match="not a site"):
        site_groups(make_plans(SITES, {"group.nobody": "US"}))
    with pytest.raises(InputError, match="alpha"):
        strategy.check_params({"alpha": 1.5})
    with pytest.raises(InputError, match="weighting"):
        strategy.check_params({"weighting": "biggest"})
    with pytest.raises(InputError, match="does not know"):
        strategy.check_params({"alhpa": 0.5})
    with pytest.raises(InputError, match="file name"):
        strategy.check_params({"group.a": "../x"})
    strategy.check_params({"alpha": "auto", "weighting": "uniform", "group.a": "Other", "max_update_norm": 10})


# -- the rule, by hand -------------------------------------------------------------------------
def test_group_of_two_by_hand():
    # |G| = 2: alpha = 0.1 + 1/2 = 0.6; the one other site takes all of 1 - alpha = 0.4.
    w = personalised_weights("u", {"u": 5, "v": 15}, group_size=2)
    assert w == pytest.approx({"u": 0.6, "v": 0.4})
    plans = make_plans(SITES)
    out = get_strategy("flames").combine(
        plans, "group:US", "w", [contribution("u", 5, [1.0, 10.0]), contribution("v", 15, [3.0, -2.0])]
    )
    assert out["u"] == pytest.approx([0.6 * 1 + 0.4 * 3, 0.6 * 10 + 0.4 * -2])     # [1.8, 5.2]
    assert out["v"] == pytest.approx([0.6 * 3 + 0.4 * 1, 0.6 * -2 + 0.4 * 10])     # [2.2, 2.8]
    assert out["u"].dtype == np.float64


def test_group_of_three_by_hand():
    # |G| = 3: alpha = 0.1 + 1/3 = 0.4333...; for site a (n=10) the others are b (n=20), c (n=40):
    # inverse counts 1/20 = 0.05 and 1/40 = 0.025 -> shares 2/3 and 1/3 of 1 - alpha = 0.5667.
    alpha = 0.1 + 1 / 3
    w = personalised_weights("a", {"a": 10, "b": 20, "c": 40}, group_size=3)
    assert w == pytest.approx({"a": alpha, "b": (1 - alpha) * 2 / 3, "c": (1 - alpha) / 3})
    # for site c the others are a (1/10) and b (1/20): shares 2/3 and 1/3 — the smaller site weighs more
    w = personalised_weights("c", {"a": 10, "b": 20, "c": 40}, group_size=3)
    assert w == pytest.approx({"c": alpha, "a": (1 - alpha) * 2 / 3, "b": (1 - alpha) / 3})

    plans = make_plans(SITES)
    contributions = [contribution("a", 10, [1.0, 0.0]), contribution("b", 20, [0.0, 1.0]), contribution("c", 40, [4.0, 4.0])]
    out = get_strategy("flames").combine(plans, "group:MRI", "w", contributions)
    a_expected = np.array([alpha * 1 + (1 - alpha) * (2 / 3 * 0 + 1 / 3 * 4), alpha * 0 + (1 - alpha) * (2 / 3 * 1 + 1 / 3 * 4)])
    assert out["a"] == pytest.approx(a_expected)
    # b: others a (1/10) and c (1/40): shares 0.8 and 0.2
    b_expected = np.array([alpha * 0 + (1 - alpha) * (0.8 * 1 + 0.2 * 4), alpha * 1 + (1 - alpha) * (0.8 * 0 + 0.2 * 4)])
    assert out["b"] == pytest.approx(b_expected)
    # the server model is the plain mean of the group
    model = get_strategy("flames").pool_model(plans, "group:MRI", "w", contributions, out)
    assert model == pytest.approx([5 / 3, 5 / 3])


def test_one_site_group_keeps_its_weights_every_round():
    # The reference computes alpha = 1.1 and scales the weights by 1.1 each round; fedseg keeps them.
    plans = make_plans(SITES)
    strategy = get_strategy("flames")
    weights = np.array([0.25, -3.0], dtype=np.float32)
    for _ in range(3):
        out = strategy.combine(plans, "group:CT", "w", [contribution("x", 7, weights)])
        assert np.array_equal(out["x"], weights.astype(np.float64))
        weights = out["x"].astype(np.float32)
    assert personalised_weights("x", {"x": 7}, group_size=1) == {"x": 1.0}
    # a site whose group-mates sent nothing this round keeps its weights too
    assert personalised_weights("u", {"u": 5}, group_size=2) == {"u": 1.0}


def test_alpha_and_weighting_options():
    assert personalised_weights("a", {"a": 10, "b": 20, "c": 40}, 3, alpha=0.5) == pytest.approx(
        {"a": 0.5, "b": 0.5 * 2 / 3, "c": 0.5 / 3})
    assert personalised_weights("a", {"a": 10, "b": 20, "c": 40}, 3, alpha=0.5, weighting="n_cases") == pytest.approx(
        {"a": 0.5, "b": 0.5 / 3, "c": 0.5 * 2 / 3})
    assert personalised_weights("a", {"a": 10, "b": 20, "c": 40}, 3, alpha=0.2, weighting="uniform") == pytest.approx(
        {"a": 0.2, "b": 0.4, "c": 0.4})
    plans = make_plans(SITES, {"alpha": 0.0})
    out = get_strategy("flames").combine(
        plans, "group:US", "w", [contribution("u", 5, [1.0, 1.0]), contribution("v", 15, [3.0, 3.0])]
    )
    assert out["u"] == pytest.approx([3.0, 3.0]) and out["v"] == pytest.approx([1.0, 1.0])


def test_plan_defaults_to_dice_focal_for_flames_only(tmp_path: Path):
    from fedseg.federation.plan_building import strategy_traits
    from fedseg.planning.planner import training_defaults

    assert training_defaults(strategy_traits(get_strategy("flames"), {})) == {"loss": "dice_focal"}
    assert training_defaults(strategy_traits(get_strategy("fedavg"), {})) == {}


# -- the engine: two groups, personalised site files, one server model per modality -------------
def test_aggregate_round_writes_personalised_sites_and_modality_models(tmp_path: Path):
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.site_update import compose_site_state
    from fedseg.federation.weightfile import WeightMeta, read_weight_file, write_weight_file

    sites = {"a": ("MRI", 10), "b": ("MRI", 30), "u": ("US", 4), "x": ("CT", 7)}
    manifest = {"w": {"shape": [2], "dtype": "float32"}}
    plans = make_plans(sites, manifest=manifest)
    values = {"a": [1.0, 2.0], "b": [3.0, 6.0], "u": [-1.0, 5.0], "x": [7.0, 7.0]}
    paths = []
    for site, v in values.items():
        meta = WeightMeta(kind="update", plan_id=plans.plan_id, strategy="flames", site=site, round=1,
                          n_cases=sites[site][1], n_iterations=5, scopes={"w": f"group:{sites[site][0]}"})
        path = tmp_path / "updates" / f"{site}.safetensors"
        write_weight_file(path, {"w": np.asarray(v, dtype=np.float32)}, meta)
        paths.append(path)
    report = aggregate_round(plans, paths, tmp_path / "round_001")

    def load(rel: str) -> np.ndarray:
        return read_weight_file(tmp_path / "round_001" / rel)[0]["w"]

    # |G| = 2 in MRI: alpha 0.6
    assert load("a.safetensors") == pytest.approx([0.6 * 1 + 0.4 * 3, 0.6 * 2 + 0.4 * 6])
    assert load("b.safetensors") == pytest.approx([0.6 * 3 + 0.4 * 1, 0.6 * 6 + 0.4 * 2])
    assert load("u.safetensors") == pytest.approx([-1.0, 5.0])      # alone in US: unchanged
    assert load("models/MRI.safetensors") == pytest.approx([2.0, 4.0])
    assert load("models/US.safetensors") == pytest.approx([-1.0, 5.0])
    assert load("models/CT.safetensors") == pytest.approx([7.0, 7.0])
    assert report.weights["group:MRI"] == pytest.approx({"a": 0.5, "b": 0.5})
    model_meta = read_weight_file(tmp_path / "round_001" / "models" / "MRI.safetensors")[1]
    assert model_meta.extra["sites"] == ["a", "b"]
    summary = json.loads((tmp_path / "round_001" / "aggregate.json").read_text())
    assert summary["strategy"] == "flames"
    # a site can start from (or predict with) its group's server model
    state = compose_site_state(plans, "b", tmp_path / "round_001" / "models" / "MRI.safetensors", None)
    assert state["w"] == pytest.approx([2.0, 4.0])

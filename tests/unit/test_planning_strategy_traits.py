"""Planning takes what it needs of the strategy as data (StrategyTraits), and plan building
reads those traits from the strategy with its final params."""

from __future__ import annotations

import pytest

from fedseg.errors import InputError
from fedseg.federation.plan_building import strategy_traits
from fedseg.federation.strategies import get_strategy, strategy_names
from fedseg.planning.overrides import final_strategy_params
from fedseg.planning.planner import make_plans
from fedseg.planning.strategy_traits import StrategyTraits
from fedseg.training.recipes.traits import recipe_traits
from test_planning_planner import fake_fingerprint, three_sites

REGION_LABELS = {"background": 0, "whole": [1, 2], "core": 2}


def _region_sites() -> list[dict]:
    fps = [fake_fingerprint(f"s{i}", [(1.0, 1.0, 1.0)] * 3, [(32, 32, 32)] * 3, labels=REGION_LABELS, seed=i)
           for i in range(2)]
    return [{**fp, "regions_class_order": [1, 2]} for fp in fps]


def test_neutral_traits_by_default() -> None:
    fps = three_sites(shape=(32, 32, 32))
    assert make_plans(fps, "x").plan_id == make_plans(fps, "x", traits=StrategyTraits("x")).plan_id
    with pytest.raises(ValueError, match="traits"):
        make_plans(fps, "x", traits=StrategyTraits("y"))
    with pytest.raises(InputError, match="strategy name"):
        make_plans(fps, "")


def test_per_site_and_training_defaults_come_from_the_traits() -> None:
    fps = three_sites(shape=(32, 32, 32))
    traits = StrategyTraits("x", plans_per_site=True, training_defaults={"loss": "dice_focal"})
    plans = make_plans(fps, "x", traits=traits)
    assert len(plans.configurations) == 3 and all(info.configuration for info in plans.sites.values())
    assert plans.training.loss == "dice_focal"
    assert make_plans(fps, "x", traits=traits, overrides={"training.loss": "dice_ce"}).training.loss == "dice_ce"
    assert len(make_plans(fps, "x", traits=traits, per_site=False).configurations) == 1
    with pytest.raises(InputError, match="training.loss"):
        make_plans(fps, "x", traits=StrategyTraits("x", training_defaults={"loss": "mse"}))


def test_mixed_channels_need_traits_that_allow_them() -> None:
    fps = [fake_fingerprint("a", [(1.0, 1.0, 1.0)] * 3, [(32, 32, 32)] * 3, channel_names={"0": "T1", "1": "T2"}),
           fake_fingerprint("b", [(1.0, 1.0, 1.0)] * 3, [(32, 32, 32)] * 3, channel_names={"0": "T1"}, seed=1)]
    with pytest.raises(InputError, match="channel"):
        make_plans(fps, "x")
    plans = make_plans(fps, "x", traits=StrategyTraits("x", requires_same_channels=False))
    assert list(plans.channel_names.values()) == ["T1", "T2"] and plans.sites["b"].channels == ["T1"]


def test_region_labels_refused_without_naming_other_strategies() -> None:
    fps = _region_sites()
    assert make_plans(fps, "x").regions_class_order == [1, 2]
    with pytest.raises(InputError) as caught:
        make_plans(fps, "x", traits=StrategyTraits("x", supports_regions=False))
    assert caught.value.detail == ("strategy 'x' does not train region-based labels (lists in dataset.json's labels); "
                                   "choose a strategy whose model trains them")


@pytest.mark.parametrize("name", strategy_names())
def test_strategy_traits_read_the_strategy_and_its_recipe(name) -> None:
    impl = get_strategy(name)
    recipe = recipe_traits(impl.recipe)
    traits = strategy_traits(impl, {})
    assert traits.name == name
    assert traits.plans_per_site == impl.plans_per_site
    assert traits.supports_regions == recipe.supports_regions
    assert traits.requires_same_channels == (impl.requires_same_channels({}) and recipe.requires_same_channels)
    assert dict(traits.training_defaults) == dict(recipe.training_defaults)


def test_what_each_strategy_plans() -> None:
    got = {name: strategy_traits(get_strategy(name), {}) for name in strategy_names()}
    assert [n for n, t in got.items() if t.plans_per_site] == ["asymfedavg"]
    assert sorted(n for n, t in got.items() if not t.supports_regions) == ["fedmsa", "fedsam", "flames", "mixmfl"]
    assert [n for n, t in got.items() if not t.requires_same_channels] == ["mixmfl"]
    assert {n: dict(t.training_defaults) for n, t in got.items() if t.training_defaults} == {"flames": {"loss": "dice_focal"}}


def test_strategy_traits_follow_the_final_params() -> None:
    fedavg = get_strategy("fedavg")
    assert strategy_traits(fedavg, final_strategy_params({})).requires_same_channels
    params = final_strategy_params({"missing": "zero", "training.rounds": "3"}, {"weighting": "uniform"})
    assert params == {"missing": "zero", "weighting": "uniform"}
    assert not strategy_traits(fedavg, params).requires_same_channels
    assert final_strategy_params({"weighting": "n_cases"}, {"weighting": "uniform"}) == {"weighting": "n_cases"}

"""Model recipes: the same networks as the strategies build, the same refusals as their
check_params, and traits that hold without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedseg.errors import InputError
from fedseg.federation.strategies import get_strategy
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec
from fedseg.training.recipes.params import SAM_CONFIG_NAMES, MixMFLParams, SamParams, is_frozen_backbone
from fedseg.training.recipes.registry import get_recipe
from fedseg.training.recipes.traits import recipe_names, recipe_traits
from fedseg.typed_params import param_keys, parse_params

# strategy -> the recipe its network is
RECIPE_OF = {"fedavg": "unet", "local": "unet", "flames": "unet_dice_focal", "mixmfl": "mixmfl",
             "fedmsa": "sam_adapters", "fedsam": "sam_full"}


def _plans(strategy: str, params: dict | None = None, seed: int = 7) -> Plans:
    if strategy in ("fedmsa", "fedsam"):
        network = NetworkSpec(2, [32, 64], [[3, 3], [3, 3]], [[1, 1], [2, 2]], [2, 2], [2])
        config = ConfigurationPlan("2d", [1.0, 1.0], [64, 64], [1, 64, 64], 2, ["ZScoreNormalization"], [False], network)
        channels, sites = {"0": "fundus"}, {s: SiteInfo("fundus", ["fundus"], 4) for s in ("a", "b")}
    else:
        network = NetworkSpec(3, [4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [2, 2, 2], [2, 2])
        config = ConfigurationPlan("3d_fullres", [1.0] * 3, [16, 16, 16], [16.0] * 3, 2,
                                   ["ZScoreNormalization"] * 2, [False] * 2, network)
        channels = {"0": "T1", "1": "T2"}
        sites = {"a": SiteInfo("MRI", ["T1"], 3), "b": SiteInfo("MRI", ["T1", "T2"], 5)}
    return Plans("t", channels, {"background": 0, "fg": 1, "other": 2}, ".nii.gz", {}, sites,
                 StrategySpec(strategy, dict(params or {})), {config.name: config}, config.name, seed=seed)


def _reference_network(strategy: str, plans: Plans, site: str) -> torch.nn.Module:
    """The network as the strategies built it before the recipes existed (their `network`)."""
    from fedseg.data.channels import channel_keys, plan_channel_list, present_channels
    from fedseg.training.mixmfl_network import build_mixmfl_network
    from fedseg.training.network import build_network
    from fedseg.training.sam import build_sam_segmenter, sam_config

    params = plans.strategy.params
    if strategy == "mixmfl":
        sequences = plan_channel_list(plans.channel_names)
        defaults = {"memory_size": 200, "memory": True, "memory_query": "both"}
        p = {**defaults, **{k: v for k, v in params.items() if k in defaults}}
        return build_mixmfl_network(
            plans.configuration_for(site), channel_keys(sequences), plans.n_classes,
            present=present_channels(sequences, plans.site(site).channels), memory_size=p["memory_size"],
            use_memory=p["memory"], memory_query=p["memory_query"], seed=plans.seed,
        )
    if strategy in ("fedmsa", "fedsam"):
        adapters = strategy == "fedmsa"
        return build_sam_segmenter(
            sam_config(params.get("sam.config", "tiny"), params.get("sam.image_size")), plans.n_channels, plans.n_classes,
            adapters=adapters, freeze_backbone=adapters,
            checkpoint=params.get("sam.checkpoint"), checkpoint_sha256=params.get("sam.checkpoint_sha256"),
            seed=plans.seed, zero_adapters=params.get("sam.adapter_init", "zero") == "zero",
        )
    return build_network(plans.configuration_for(site), plans.n_channels, plans.n_classes, seed=plans.seed)


def _reference_trainer(strategy: str) -> type:
    from fedseg.training.mixmfl_trainer import MixMFLTrainer
    from fedseg.training.sam_trainer import SamTrainer
    from fedseg.training.trainer import SiteTrainer

    return {"mixmfl": MixMFLTrainer, "fedmsa": SamTrainer, "fedsam": SamTrainer}.get(strategy, SiteTrainer)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].shape == sb[name].shape and sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    assert [n for n, p in a.named_parameters() if p.requires_grad] == [n for n, p in b.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("strategy, params", [
    ("fedavg", {}), ("local", {}), ("flames", {}),
    ("mixmfl", {}), ("mixmfl", {"memory": False, "memory_size": 5, "memory_query": "shared"}),
    ("fedmsa", {}), ("fedmsa", {"sam.adapter_init": "default"}), ("fedsam", {}),
])
@pytest.mark.parametrize("site", ["a", "b"])
def test_the_recipe_builds_the_strategys_network_bit_for_bit(strategy, params, site) -> None:
    plans = _plans(strategy, params)
    assert get_strategy(strategy).recipe == RECIPE_OF[strategy]
    recipe = get_recipe(RECIPE_OF[strategy])
    theirs = _reference_network(strategy, plans, site)
    ours = recipe.network(plans, site)
    assert type(ours) is type(theirs)
    _same_state(ours, theirs)
    assert recipe.trainer_class(plans) is _reference_trainer(strategy)


def test_another_seed_builds_other_weights() -> None:
    recipe = get_recipe("unet")
    one, other = recipe.network(_plans("fedavg", seed=1), "a"), recipe.network(_plans("fedavg", seed=2), "a")
    assert not all(torch.equal(x, y) for x, y in zip(one.state_dict().values(), other.state_dict().values()))


# what the strategies said of their models before the recipes held it
EXPECTED_TRAITS = {
    "unet": (True, {}, True), "unet_dice_focal": (False, {"loss": "dice_focal"}, True),
    "mixmfl": (False, {}, False), "sam_adapters": (False, {}, True), "sam_full": (False, {}, True),
}


@pytest.mark.parametrize("recipe", sorted(EXPECTED_TRAITS))
def test_traits(recipe) -> None:
    traits = recipe_traits(recipe)
    assert (traits.supports_regions, dict(traits.training_defaults), traits.requires_same_channels) == EXPECTED_TRAITS[recipe]


@pytest.mark.parametrize("strategy, recipe", sorted(RECIPE_OF.items()))
def test_the_strategies_know_the_recipes_keys(strategy, recipe) -> None:
    traits = recipe_traits(recipe)
    if traits.params is not None:
        assert param_keys(traits.params) <= get_strategy(strategy).param_names()


def test_registry_and_traits_name_the_same_recipes() -> None:
    assert recipe_names() == ["mixmfl", "sam_adapters", "sam_full", "unet", "unet_dice_focal"]
    for name in recipe_names():
        assert get_recipe(name).traits is recipe_traits(name) and get_recipe(name).name == name
    with pytest.raises(InputError, match="unknown model recipe 'nope'"):
        recipe_traits("nope")
    with pytest.raises(InputError, match="unknown model recipe"):
        get_recipe("nope")


def test_frozen_backbone_rule_is_the_networks() -> None:
    from fedseg.training import sam

    assert SAM_CONFIG_NAMES == tuple(sorted(sam.SAM_CONFIGS))
    net = get_recipe("sam_adapters").network(_plans("fedmsa"), "a")
    names = list(net.all_tensors()) if hasattr(net, "all_tensors") else [n for n, _ in net.named_parameters()]
    for name in names:
        assert is_frozen_backbone(name) == sam.is_frozen_backbone(name), name
    traits = recipe_traits("sam_adapters")
    assert traits.stays_local("image_encoder.blocks.0.attn.qkv.weight")
    assert not traits.stays_local("image_encoder.blocks.0.Space_Adapter.D_fc1.weight")
    assert not recipe_traits("sam_full").stays_local("image_encoder.blocks.0.attn.qkv.weight")


MIXMFL_BAD = [
    {"memory": "yes"}, {"triplet": 1}, {"classifier": None},
    {"lambda_cls": -1}, {"lambda_triplet": True}, {"triplet_margin": "1"},
    {"memory_query": "all"}, {"memory_size": 0}, {"prototypes": 2.5}, {"memory_size": True},
    {"lambda_cls": -1, "memory_size": 0}, {"memory": "no", "lambda_cls": -1},
]
SAM_BAD = [
    {"sam.config": "x"}, {"sam.config": None}, {"sam.checkpoint": ""}, {"sam.checkpoint": 3},
    {"sam.checkpoint_sha256": "abc"}, {"sam.checkpoint_sha256": 5}, {"sam.lr": 0}, {"sam.lr": "fast"},
    {"sam.lr": True}, {"sam.optimizer": "sgd"}, {"sam.lr_schedule": "cosine"}, {"sam.adapter_init": "random"},
    {"sam.image_size": 0}, {"sam.image_size": "big"}, {"sam.image_size": True},
    {"sam.config": "x", "sam.image_size": 0}, {"sam.lr": -1, "sam.optimizer": "sgd"},
]


def _refusal(check, params) -> str:
    with pytest.raises(InputError) as caught:
        check(params)
    return caught.value.detail


@pytest.mark.parametrize("params", MIXMFL_BAD)
def test_mixmfl_params_refuse_what_the_strategy_refuses(params) -> None:
    assert _refusal(lambda p: parse_params(MixMFLParams, p), params) == \
        _refusal(get_strategy("mixmfl").check_params, params)


@pytest.mark.parametrize("strategy", ["fedmsa", "fedsam"])
@pytest.mark.parametrize("params", SAM_BAD)
def test_sam_params_refuse_what_the_strategy_refuses(strategy, params) -> None:
    assert _refusal(lambda p: parse_params(SamParams, p), params) == _refusal(get_strategy(strategy).check_params, params)


def test_messages_in_the_strategies_words() -> None:
    assert _refusal(lambda p: parse_params(MixMFLParams, p), {"lambda_cls": -1}) == "lambda_cls must be a number >= 0, got -1"
    assert _refusal(lambda p: parse_params(MixMFLParams, p), {"memory_size": 0}) == "memory_size must be a positive integer, got 0"
    assert _refusal(lambda p: parse_params(SamParams, p), {"sam.config": "x"}) == \
        "sam.config must be one of tiny, vit_b, vit_h, vit_l, got 'x'"


def test_defaults_are_the_papers_and_the_strategies_read_them() -> None:
    mixmfl = parse_params(MixMFLParams, {})
    assert vars(mixmfl) == {"memory": True, "triplet": True, "classifier": True, "lambda_cls": 0.5,
                            "lambda_triplet": 1e-4, "triplet_margin": 1.0, "memory_query": "both",
                            "memory_size": 200, "prototypes": 16}
    assert param_keys(SamParams) == {"sam.config", "sam.checkpoint", "sam.checkpoint_sha256", "sam.image_size",
                                     "sam.lr", "sam.optimizer", "sam.lr_schedule", "sam.adapter_init"}
    # a strategy reads its recipe's keys besides its rule's
    assert get_strategy("mixmfl").param_names() >= param_keys(MixMFLParams) | {"tailored", "tailored_weighting"}
    assert get_strategy("fedmsa").param_names() >= param_keys(SamParams) | {"weighting", "missing"}


def test_traits_import_no_torch() -> None:
    code = ("import sys\nimport fedseg.training.recipes.traits\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('fedseg.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(["fedseg.training", "fedseg.training.recipes", "fedseg.training.recipes.params",
                               "fedseg.training.recipes.traits"])

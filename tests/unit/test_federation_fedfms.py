"""fedmsa / fedsam strategies: parameters, scopes, what an update holds, round-trip through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedseg.errors import InputError
from fedseg.federation.routes import route_table
from fedseg.federation.strategies import get_strategy, strategy_names
from fedseg.training.recipes.registry import get_recipe
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec


def _plans(strategy: str, **params) -> Plans:
    config = ConfigurationPlan(
        name="2d", spacing=[1.0, 1.0], patch_size=[64, 64], median_image_size_in_voxels=[1, 64, 64], batch_size=2,
        normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
        network=NetworkSpec(2, [32, 64], [[3, 3], [3, 3]], [[1, 1], [2, 2]], [2, 2], [2]),
    )
    return Plans(
        dataset_name="t", channel_names={"0": "fundus"}, labels={"background": 0, "disc": 1, "cup": 2},
        file_ending=".png", fingerprint={}, sites={s: SiteInfo("fundus", ["fundus"], 4) for s in ("a", "b")},
        strategy=StrategySpec(strategy, dict(params)), configurations={"2d": config}, default_configuration="2d",
    )


def test_registered() -> None:
    assert {"fedmsa", "fedsam"} <= set(strategy_names())


@pytest.mark.parametrize("params, message", [
    ({"sam.config": "vit_z"}, "sam.config"),
    ({"sam.image_size": "big"}, "sam.image_size"),
    ({"sam.lr": -1}, "sam.lr"),
    ({"sam.checkpoint_sha256": "abc"}, "sha256"),
    ({"sam.typo": 1}, "does not know"),
    ({"sam.optimizer": "sgd"}, "sam.optimizer must be one of adamw, adam"),
    ({"sam.lr_schedule": "cosine"}, "sam.lr_schedule"),
    ({"sam.adapter_init": "random"}, "sam.adapter_init"),
])
def test_bad_params_are_refused(params, message) -> None:
    with pytest.raises(InputError, match=message):
        get_strategy("fedmsa").check_params(params)


def test_fedmsa_keeps_the_backbone_out_of_every_file() -> None:
    from fedseg.federation.plan_building import attach_manifests

    msa, sam = attach_manifests(_plans("fedmsa")), attach_manifests(_plans("fedsam"))
    msa_routes, sam_routes = route_table(msa), route_table(sam)
    assert msa_routes.pool_of("a", "image_encoder.blocks.0.Space_Adapter.D_fc1.weight") == "global"
    assert msa_routes.pool_of("a", "mask_decoder.class_head.weight") == "global"
    assert sam_routes.pool_of("a", "image_encoder.blocks.0.attn.qkv.weight") == "global"

    msa_manifest = msa.extra["manifests"]["2d"]
    sam_manifest = sam.extra["manifests"]["2d"]
    # the frozen backbone is rebuilt at each site (checkpoint or seed): not even in the manifest
    assert not any(n.startswith("image_encoder.") and "Adapter" not in n for n in msa_manifest)
    assert any("Space_Adapter" in n for n in msa_manifest) and not any("Adapter" in n for n in sam_manifest)
    size = lambda m: sum(torch.Size(e["shape"]).numel() for e in m.values())  # noqa: E731
    assert size(msa_manifest) * 3 <= size(sam_manifest)


def test_network_follows_the_plan_params(tmp_path: Path) -> None:
    net = get_recipe("sam_full").network(_plans("fedsam", **{"sam.image_size": 96}), "a")
    assert net.config.image_size == 96 and net.n_classes == 3
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(InputError, match="not found"):
        get_recipe("sam_adapters").network(_plans("fedmsa", **{"sam.checkpoint": str(tmp_path / "none.pth")}), "a")
    assert get_recipe("sam_adapters").trainer_class(_plans("fedmsa")).__name__ == "SamTrainer"


def test_fedmsa_round_trip_through_the_engine(tmp_path: Path) -> None:
    """init -> a site's update (adapters + decoder only) -> aggregate -> the site composes its model."""
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.site_update import compose_site_state, write_site_update
    from fedseg.federation.round_zero import initial_round
    from fedseg.federation.plan_building import attach_manifests
    from fedseg.federation.weightfile import read_weight_file

    plans = attach_manifests(_plans("fedmsa"))
    initial_round(plans, tmp_path / "r0")
    tensors, _ = read_weight_file(tmp_path / "r0" / "a.safetensors")
    assert not any(n.startswith("image_encoder.") and "Adapter" not in n for n in tensors)
    recipe = get_recipe("sam_adapters")
    updates = []
    for site, shift in (("a", 1.0), ("b", 3.0)):
        net = recipe.network(plans, site)
        state = compose_site_state(plans, site, tmp_path / "r0" / f"{site}.safetensors", None)
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        with torch.no_grad():
            net.mask_decoder.class_head.bias.fill_(shift)
        write_site_update(plans, site, net.state_dict(), tmp_path / f"{site}.safetensors", round_index=1, n_iterations=1)
        updates.append(tmp_path / f"{site}.safetensors")
    report = aggregate_round(plans, updates, tmp_path / "r1")
    merged, _ = read_weight_file(tmp_path / "r1" / "a.safetensors")
    assert torch.allclose(torch.from_numpy(merged["mask_decoder.class_head.bias"]), torch.full((3,), 2.0))
    traffic = report.traffic
    assert traffic["per_site"]["a"]["upload"] == (tmp_path / "a.safetensors").stat().st_size
    assert traffic["per_site"]["b"]["download"] == (tmp_path / "r1" / "b.safetensors").stat().st_size
    assert traffic["upload"] == sum(v["upload"] for v in traffic["per_site"].values())


def test_the_papers_recipe_as_plan_params() -> None:
    """training.loss=bce, sam.optimizer=adam, sam.lr_schedule=constant, sam.adapter_init=default:
    Adam with betas 0.9 / 0.999 and no weight decay at a constant rate, adapters not zero."""
    from fedseg.training.sam_trainer import SamTrainer

    paper = _plans("fedmsa", **{"sam.optimizer": "adam", "sam.lr_schedule": "constant", "sam.adapter_init": "default"})
    net = get_recipe("sam_adapters").network(paper, "a")
    fc2 = [p for n, p in net.named_parameters() if n.endswith("D_fc2.weight")]
    assert fc2 and all(p.abs().sum() > 0 for p in fc2)
    default = get_recipe("sam_adapters").network(_plans("fedmsa"), "a")
    assert all(p.abs().sum() == 0 for n, p in default.named_parameters() if n.endswith("D_fc2.weight"))

    trainer = object.__new__(SamTrainer)
    trainer.plans, trainer.network = paper, net
    trainer.optimizer = trainer.make_optimizer()
    assert type(trainer.optimizer) is torch.optim.Adam
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0
    trainer.set_lr(1e-5)                      # the poly schedule's value: ignored
    assert group["lr"] == trainer.base_lr
    trainer.plans = _plans("fedmsa")
    trainer.optimizer = trainer.make_optimizer()
    assert type(trainer.optimizer) is torch.optim.AdamW
    trainer.set_lr(trainer.plans.training.initial_lr / 2)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.base_lr / 2)


def test_bce_loss_is_the_mean_binary_cross_entropy_of_the_one_hot_masks() -> None:
    from fedseg.training.losses import make_loss

    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]])          # (1, 3 classes, 1, 1)
    target = torch.tensor([[[[2.0]]]])                             # class 2
    expected = -(torch.log(1 - torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.tensor(0.5))
                 + torch.log(torch.sigmoid(torch.tensor(-1.0)))) / 3
    torch.testing.assert_close(make_loss("bce")(logits, target), expected)

"""Planning: nnU-Net's rules on a merged fingerprint, deterministic and order-independent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.errors import InputError
from fedseg.planning.planner import make_plans, plan_patch_and_network, pool_and_conv_props, target_spacing
from fedseg.planning.plans import Plans
from fedseg.planning.fingerprint import FINGERPRINT_FORMAT_VERSION, channel_stats
from fedseg.planning.sketch import QuantileSketch

LABELS = {"background": 0, "tumour": 1}


def fake_fingerprint(site, spacings, shapes, channel_names=None, labels=None, relative=0.9, seed=0, image_dim=3):
    """A valid site fingerprint built from synthetic foreground values (no images needed)."""
    rng = np.random.default_rng(seed)
    channel_names = channel_names or {"0": "T1"}
    n = len(spacings)
    stats = {}
    for c in channel_names:
        # one sketch per case, foregrounds of different sizes
        stats[c] = channel_stats([QuantileSketch().add(rng.normal(100 + 10 * seed, 20, 500 * (i + 1)))
                                  for i in range(n)])
    return {
        "format": "fedseg.fingerprint", "format_version": FINGERPRINT_FORMAT_VERSION, "site": site,
        "dataset_name": "demo", "modality": "MRI", "channel_names": channel_names, "labels": dict(labels or LABELS),
        "file_ending": ".png" if image_dim == 2 else ".nii.gz", "image_dim": image_dim, "n_cases": n,
        "case_ids": [f"{site}_{i}" for i in range(n)],
        "spacings": [list(map(float, s)) for s in spacings], "shapes_after_crop": [list(map(int, s)) for s in shapes],
        "relative_sizes_after_crop": [relative] * n, "foreground_stats_per_channel": stats,
    }


def three_sites(shape=(96, 128, 128), spacing=(1.0, 1.0, 1.0), **kw):
    return [
        fake_fingerprint("hospital_b", [spacing] * 4, [shape] * 4, seed=1, **kw),
        fake_fingerprint("hospital_a", [spacing] * 3, [shape] * 3, seed=2, **kw),
        fake_fingerprint("hospital_c", [tuple(s * 1.2 for s in spacing)] * 5, [shape] * 5, seed=3, **kw),
    ]


def test_plan_is_deterministic_and_order_independent():
    fps = three_sites()
    first = make_plans(fps, strategy="fedavg")
    again = make_plans(fps, strategy="fedavg")
    shuffled = make_plans([fps[2], fps[0], fps[1]], strategy="fedavg")
    assert first.plan_id == again.plan_id == shuffled.plan_id
    assert first.to_json() == shuffled.to_json()
    # plan_id survives the JSON round trip
    assert Plans.from_dict(json.loads(first.to_json())).plan_id == first.plan_id
    assert list(first.sites) == ["hospital_a", "hospital_b", "hospital_c"]
    assert sum(s.n_cases for s in first.sites.values()) == first.fingerprint["n_cases"] == 12
    assert first.strategy.name == "fedavg" and first.default_configuration == "3d_fullres"
    # a different budget is a different plan
    assert make_plans(fps, "fedavg", budget=8).plan_id != first.plan_id


def test_plan_id_is_the_hash_of_the_plans_content_with_and_without_regions():
    """plan_id is computed from the dataclasses without copying them; it must stay the sha256
    of the canonical JSON of `content_dict()` (what plans.json holds), plain labels leaving
    `regions_class_order` out as before regions existed."""
    import dataclasses
    import hashlib

    from fedseg.planning.plans import canonical_json

    plain = make_plans(three_sites(), strategy="fedavg")
    regions = dataclasses.replace(plain, regions_class_order=[1])
    assert "regions_class_order" not in plain.content_dict() and regions.content_dict()["regions_class_order"] == [1]
    for plans in (plain, regions):
        assert plans.plan_id == hashlib.sha256(canonical_json(plans.content_dict()).encode("utf-8")).hexdigest()
    assert plain.plan_id != regions.plan_id


def test_default_budget_fits_a_cpu():
    small = make_plans(three_sites(shape=(32, 32, 32)), "fedavg").configuration_for(None)
    assert all(p <= 32 for p in small.patch_size)
    large = make_plans(three_sites(shape=(96, 128, 128)), "fedavg").configuration_for(None)
    assert np.prod(large.patch_size) <= 64 ** 3
    assert large.batch_size >= 2


@pytest.mark.parametrize("shape,spacing,config", [
    ((96, 128, 128), (1.0, 1.0, 1.0), "3d_fullres"),
    ((20, 256, 256), (5.0, 0.8, 0.8), "3d_fullres"),
    ((37, 61, 45), (1.3, 0.9, 1.1), "3d_fullres"),
    ((37, 150, 121), (1.3, 0.9, 1.1), "2d"),
])
def test_patch_divisible_by_pooling(shape, spacing, config):
    cfg = make_plans(three_sites(shape, spacing), "fedavg", configuration=config, budget=2).configuration_for(None)
    net = cfg.network
    assert len(cfg.patch_size) == len(cfg.spacing) == (3 if config == "3d_fullres" else 2)
    assert net.strides[0] == [1] * cfg.ndim and len(net.strides) == len(net.kernel_sizes) == net.n_stages
    pools = np.sum(np.array(net.strides) == 2, axis=0)
    assert all(p % (2 ** k) == 0 for p, k in zip(cfg.patch_size, pools))
    assert net.n_stages <= (6 if cfg.ndim == 3 else 7)
    assert net.features_per_stage[0] == 32
    assert all(f <= (320 if cfg.ndim == 3 else 512) for f in net.features_per_stage)
    assert len(net.n_conv_per_stage_decoder) == net.n_stages - 1


def test_anisotropic_spacing():
    spacings = [(5.0, 0.8, 0.8)] * 6 + [(3.0, 0.8, 0.8)] * 3 + [(6.0, 0.8, 0.8)]
    shapes = [(20, 256, 256)] * 10
    target = target_spacing(spacings, shapes)
    assert target[0] == pytest.approx(np.percentile([s[0] for s in spacings], 10))
    assert list(target[1:]) == [0.8, 0.8]
    fps = [fake_fingerprint("s1", spacings[:5], shapes[:5]), fake_fingerprint("s2", spacings[5:], shapes[5:], seed=4)]
    cfg = make_plans(fps, "fedavg").configuration_for(None)
    assert cfg.spacing[0] == pytest.approx(target[0])
    net = cfg.network
    assert net.kernel_sizes[0] == [1, 3, 3]          # no convolution across thick slices at full resolution
    assert net.strides[1] == [1, 2, 2]               # pool in-plane first
    # isotropic data is left at the median
    assert list(target_spacing([(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.5, 1.5, 1.5)], [(50, 50, 50)] * 3)) == [1.5] * 3


def test_pool_and_conv_props_matches_nnunet():
    # expected values are nnunetv2 2.x's get_pool_and_conv_props output for the same input
    pools, strides, kernels, patch, divisor = pool_and_conv_props((3.0, 0.7, 0.7), (48, 112, 80))
    assert pools == [3, 4, 4] and patch == [48, 112, 80] and divisor == [8, 16, 16]
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 1]]
    assert kernels == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    # ... and its ExperimentPlanner at 8 GB turns a 115x320x232 median shape at (1, 0.79, 0.79) mm
    # into an 80x192x160 patch
    patch, network, _ = plan_patch_and_network((1.0, 0.79, 0.79), (115, 320, 232), n_classes=2, budget=8)
    assert patch == [80, 192, 160] and network.n_stages == 6


def test_normalisation_by_channel_name():
    fps = three_sites(channel_names={"0": "CT", "1": "T2"}, relative=0.5)
    cfg = make_plans(fps, "fedavg").configuration_for(None)
    assert cfg.normalization_schemes == ["CTNormalization", "ZScoreNormalization"]
    assert cfg.use_mask_for_norm == [False, True]    # cropped to < 75 %: z-score inside the mask
    lower = make_plans(three_sites(channel_names={"0": "ct"}, relative=0.9), "fedavg").configuration_for(None)
    assert lower.normalization_schemes == ["CTNormalization"] and lower.use_mask_for_norm == [False]
    fingerprint = make_plans(fps, "fedavg").fingerprint
    props = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert set(props) == {"mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5"}
    # CT normalisation reads nnU-Net's case-weighted values; the voxel-weighted ones are kept beside them
    voxel = fingerprint["foreground_intensity_properties_per_channel_voxel_weighted"]["0"]
    assert voxel.keys() == props.keys() and voxel["min"] == props["min"] and voxel["mean"] != props["mean"]


def test_overrides():
    fps = three_sites(shape=(64, 64, 64))
    plans = make_plans(
        fps, strategy="asymfedavg", strategy_params={"fedbn": False},
        overrides={"training.rounds": "5", "training.iterations_per_round": "7", "training.initial_lr": "0.02",
                   "training.loss": "dice_focal", "training.oversample_foreground_percent": "0.5",
                   "configuration.patch_size": "32,32,32", "configuration.batch_size": "3", "seed": "7",
                   "weighting": "uniform", "strategy.alpha": "0.3", "fedbn": "true"},
    )
    t = plans.training
    assert (t.rounds, t.iterations_per_round, t.initial_lr, t.loss, t.oversample_foreground_percent) == \
        (5, 7, 0.02, "dice_focal", 0.5)
    cfg = plans.configuration_for(None)
    assert cfg.patch_size == [32, 32, 32] and cfg.batch_size == 3
    pools = np.sum(np.array(cfg.network.strides) == 2, axis=0)
    assert all(32 % 2 ** k == 0 for k in pools)
    assert plans.seed == 7
    assert plans.strategy.params == {"fedbn": True, "weighting": "uniform", "alpha": 0.3}

    for bad in ({"configuration.spacing": "1,1,1"}, {"training.rounds": "zero"}, {"training.loss": "mse"},
                {"configuration.patch_size": "30,30,30"}, {"configuration.patch_size": "32,32"},
                {"training.unknown": "1"}, {"configuration.batch_size": "0"}, {"seed": "x"}):
        with pytest.raises(InputError):
            make_plans(fps, "fedavg", overrides=bad)


def test_label_disagreement_refused_naming_the_file():
    fps = three_sites()
    fps[1] = fake_fingerprint("hospital_a", [(1, 1, 1)] * 3, [(96, 128, 128)] * 3,
                              labels={"background": 0, "liver": 1})
    with pytest.raises(InputError, match="labels") as info:
        make_plans(fps, "fedavg", fingerprint_names=["b.json", "a.json", "c.json"])
    assert str(info.value.path) in ("a.json", "b.json")


def test_2d_images_get_the_2d_configuration():
    fps = [fake_fingerprint(f"s{i}", [(999.0, 1.0, 1.0)] * 20, [(1, 200, 180)] * 20, seed=i, image_dim=2)
           for i in range(2)]
    plans = make_plans(fps, "fedavg")                               # the 3d default falls back to 2d for 2D images
    cfg = plans.configuration_for(None)
    assert cfg.name == "2d" and len(cfg.spacing) == 2 and cfg.spacing == [1.0, 1.0]
    assert plans.file_ending == ".png"
    with pytest.raises(InputError, match="budget"):
        make_plans(fps, "fedavg", budget=0)


def test_single_slice_volumes_get_the_2d_configuration_and_say_so():
    """2D NIfTI (volumes of one slice): planned 2d by itself, as PNG sites are, with a note."""
    fps = [fake_fingerprint(f"s{i}", [(5.0, 0.8, 0.8)] * 10, [(1, 160, 160)] * 10, seed=i) for i in range(2)]
    for configuration in ("3d_fullres", None, "2d"):
        plans = make_plans(fps, "fedavg", configuration=configuration)
        cfg = plans.configuration_for(None)
        assert cfg.name == "2d" and cfg.spacing == [0.8, 0.8] and len(cfg.patch_size) == 2
        notes = plans.extra["planning"].get("notes", [])
        assert notes == ([] if configuration == "2d" else ["every case has a single slice: planned the 2d configuration"])
    assert plans.file_ending == ".nii.gz"


def test_per_site_configurations_on_request():
    fps = three_sites()
    common = make_plans(fps, strategy="local")
    own = make_plans(fps, strategy="local", overrides={"configuration.per_site": "true"})
    assert not any(info.configuration for info in common.sites.values())
    # each site trains the configuration planned from its own fingerprint
    assert {site: info.configuration for site, info in own.sites.items()} == {
        site: own.configuration_for(site).name for site in own.sites}
    assert len(set(own.configurations)) == 3 and own.plan_id != common.plan_id
    assert own.configuration_for("hospital_c").spacing != own.configuration_for("hospital_a").spacing
    with pytest.raises(InputError, match="per_site must be true or false"):
        make_plans(fps, strategy="local", overrides={"configuration.per_site": "3"})

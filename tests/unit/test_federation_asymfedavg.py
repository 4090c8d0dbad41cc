"""asymfedavg: per-site plans, the structural shared-parameter map, and aggregation over it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedseg.errors import InputError
from fedseg.federation.routes import route_table
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.asymfedavg import (
    input_layers,
    is_norm_parameter,
    shared_parameter_map,
    structural_key,
)
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec


def _config(features: list[int], name: str = "3d_fullres") -> ConfigurationPlan:
    n = len(features)
    spec = NetworkSpec(
        n_stages=n,
        features_per_stage=features,
        kernel_sizes=[[3, 3, 3]] * n,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        n_conv_per_stage_decoder=[2] * (n - 1),
    )
    return ConfigurationPlan(name, [1.0, 1.0, 1.0], [2 ** n] * 3, [32.0] * 3, 2, ["ZScoreNormalization"], [False], spec)


def _manifest(config: ConfigurationPlan) -> dict[str, tuple[tuple[int, ...], str]]:
    torch = pytest.importorskip("torch")
    from fedseg.training.network import build_network

    with torch.device("meta"):
        net = build_network(config, 1, 2)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def deep_and_shallow() -> dict[str, dict]:
    # Features capped at the bottleneck (as nnU-Net caps at 320): the stages right above the
    # bottleneck agree in shape although one network is a stage deeper.
    return {"deep": _manifest(_config([32, 64, 64, 64])), "shallow": _manifest(_config([32, 64, 64]))}


def test_map_pairs_decoder_stages_from_the_output_by_default(deep_and_shallow):
    shared = shared_parameter_map(deep_and_shallow)
    deep, shallow = shared["sites"]["deep"], shared["sites"]["shallow"]
    # the full-resolution decoder stage is j=2 in the deep net, j=1 in the shallow one: level 0
    for part in ("stages.{}.convs.0.conv.weight", "stages.{}.convs.1.norm.bias", "transpconvs.{}.weight", "seg_layers.{}.weight"):
        key = "decoder." + part.format("out0")
        assert deep["decoder." + part.format(2)] == shallow["decoder." + part.format(1)] == {"pool": "global", "key": key}
    # level 1: deep j=1 (128 -> 64 from a 64-wide bottleneck side) vs shallow j=0: same shapes
    assert deep["decoder.stages.1.convs.0.conv.weight"] == shallow["decoder.stages.0.convs.0.conv.weight"]
    # the deep net's extra decoder stage (right after its bottleneck) has no partner
    assert "decoder.stages.0.convs.0.conv.weight" not in deep
    assert shared["decoder_match"] == "output" and "from the output" in shared["rule"]


def test_map_pairs_decoder_stages_from_the_bottleneck_on_request(deep_and_shallow):
    shared = shared_parameter_map(deep_and_shallow, decoder_match="bottleneck")
    deep, shallow = shared["sites"]["deep"], shared["sites"]["shallow"]
    # decoder stage 0 upsamples the bottleneck in both networks: paired, one global key
    for name in ("decoder.stages.0.convs.0.conv.weight", "decoder.transpconvs.0.weight", "decoder.stages.0.convs.1.conv.weight"):
        assert deep[name] == shallow[name] == {"pool": "global", "key": name}
    # The full-resolution decoder stage is j=2 in the deep net and j=1 in the shallow one, and
    # their tensors have identical shapes: matching by resolution level (or by names counted
    # from the output) would average them. Counted from the bottleneck they are different
    # positions, so neither is shared.
    assert deep_and_shallow["deep"]["decoder.stages.2.convs.0.conv.weight"] == \
        deep_and_shallow["shallow"]["decoder.stages.1.convs.0.conv.weight"]
    assert "decoder.stages.2.convs.0.conv.weight" not in deep       # only the deep net has j=2
    assert "decoder.stages.1.convs.0.conv.weight" not in shallow    # j=1: 64->32 vs 128->64 channels
    assert "decoder.stages.1.convs.0.conv.weight" not in deep
    # encoder stages pair from the input; the deep net's extra stage stays local
    assert deep["encoder.stages.0.convs.0.conv.weight"]["pool"] == "global"
    assert deep["encoder.stages.2.convs.1.conv.weight"] == shallow["encoder.stages.2.convs.1.conv.weight"]
    assert not any(name.startswith("encoder.stages.3.") for name in deep)
    # every key of the map has one shape over all its sites
    for entry in shared["keys"].values():
        shapes = {deep_and_shallow[s][n][0] for s in entry["sites"] for n, e in shared["sites"][s].items()
                  if e["key"] == entry["key"] and e["pool"] == entry["pool"]}
        assert shapes == {tuple(entry["shape"])}


def test_layers_are_shared_whole_not_tensor_by_tensor():
    # A thick-slice site plans 1x3x3 kernels in its first stage: those convolutions differ in
    # shape from the isotropic site's, so their biases and norms (same shapes) must stay local
    # too, or channel k of one site's filters would be averaged with an unrelated channel k.
    iso = _config([32, 64, 64])
    thick = dataclasses.replace(iso, network=dataclasses.replace(iso.network, kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]]))
    manifests = {"iso": _manifest(iso), "thick": _manifest(thick), "thick2": _manifest(thick)}
    shared = shared_parameter_map(manifests)
    stage0 = [n for n in manifests["iso"] if n.startswith("encoder.stages.0.") and not n.endswith("running_mean")]
    assert stage0 and not any(n in shared["sites"]["iso"] for n in stage0)
    for name in stage0:   # the two thick-slice sites share their whole first stage
        assert shared["sites"]["thick"][name]["pool"] == "sites:thick+thick2"
    assert shared["sites"]["iso"]["encoder.stages.1.convs.0.norm.weight"]["pool"] == "global"
    assert shared["sites"]["iso"]["encoder.stages.1.convs.0.conv.weight"]["pool"] == "global"


def test_subset_pools_and_local_norms(deep_and_shallow):
    manifests = {**deep_and_shallow, "deep2": deep_and_shallow["deep"]}
    shared = shared_parameter_map(manifests)
    # the extra encoder stage of the two deep networks is shared between those two only
    entry = shared["sites"]["deep"]["encoder.stages.3.convs.0.conv.weight"]
    assert entry["pool"] == "sites:deep+deep2"
    assert shared["sites"]["deep2"]["encoder.stages.3.convs.0.conv.weight"] == entry
    assert "encoder.stages.3.convs.0.conv.weight" not in shared["sites"]["shallow"]

    fedbn = shared_parameter_map(manifests, local_norms=True)
    for site in manifests:
        assert not any(is_norm_parameter(n) for n in fedbn["sites"][site])
        assert any(is_norm_parameter(n) for n in shared["sites"][site])
    stage3 = {e["pool"] for e in shared["keys"].values() if e["key"].startswith("encoder.stages.3.")}
    assert stage3 == {"sites:deep+deep2"}


def _shared(plans) -> dict:
    """The plan's route table in the form of `shared_parameter_map`: sites -> {name: {pool, key}}, keys."""
    table = route_table(plans)
    return {"sites": {site: {name: {"pool": r.pool, "key": r.key} for name, r in table.sent(site).items()}
                      for site in table.sites},
            "keys": {f"{pool}/{key}": {"pool": pool, "key": key} for pool, key in table.members()}}


def test_strided_layers_are_shared_only_where_the_strides_agree(deep_and_shallow):
    # same shapes, but the second site downsamples its stage 1 in-plane only
    strides = {"deep": {"encoder.stages.1.convs.0": (2, 2, 2)}, "deep2": {"encoder.stages.1.convs.0": (1, 2, 2)}}
    manifests = {"deep": deep_and_shallow["deep"], "deep2": deep_and_shallow["deep"]}
    shared = shared_parameter_map(manifests, strides=strides)
    assert "encoder.stages.1.convs.0.conv.weight" not in shared["sites"]["deep"]
    assert shared["sites"]["deep"]["encoder.stages.1.convs.1.conv.weight"]["pool"] == "global"
    assert "strides" in shared["rule"]
    by_shape = shared_parameter_map(manifests)
    assert by_shape["sites"]["deep"]["encoder.stages.1.convs.0.conv.weight"]["pool"] == "global"


def test_check_params():
    strategy = get_strategy("asymfedavg")
    strategy.check_params({"weighting": "uniform", "local_norms": True, "decoder_match": "bottleneck", "match_strides": False})
    with pytest.raises(InputError, match="decoder_match must be one of output, bottleneck"):
        strategy.check_params({"decoder_match": "middle"})
    with pytest.raises(InputError, match="weighting"):
        strategy.check_params({"weighting": "median"})
    with pytest.raises(InputError, match="local_norms"):
        strategy.check_params({"local_norms": "yes"})
    with pytest.raises(InputError, match="does not know"):
        strategy.check_params({"share": "all"})


# -- plans and aggregation on the fednnunet preset -----------------------------------------

@pytest.fixture(scope="module")
def preset_fingerprints(tmp_path_factory) -> list[dict]:
    from fedseg.data.dataset import load_dataset
    from fedseg.synth import generate
    from fedseg.planning.fingerprint import compute_fingerprint

    root = tmp_path_factory.mktemp("fednnunet")
    return [compute_fingerprint(load_dataset(d), d.name) for d in generate(root, preset="fednnunet", seed=0)]


def _plans(fingerprints, **overrides):
    from fedseg.federation.plan_building import build_plans

    return build_plans(fingerprints, strategy="asymfedavg", configuration="3d_fullres", overrides=overrides, seed=1234)


def test_per_site_plans(preset_fingerprints):
    plans = _plans(preset_fingerprints)
    assert sorted(plans.configurations) == ["3d_fullres@site_a", "3d_fullres@site_b", "3d_fullres@site_c"]
    configs = {site: plans.configuration_for(site) for site in plans.sites}
    for site, info in plans.sites.items():
        assert info.configuration == f"3d_fullres@{site}"
    # each site's own slice spacing: 1, 2.5 and 4 mm
    assert [round(configs[s].spacing[0], 2) for s in ("site_a", "site_b", "site_c")] == [1.0, 2.5, 4.0]
    assert len({tuple(c.patch_size) for c in configs.values()}) == 3
    assert configs["site_c"].network.kernel_sizes[0] == [1, 3, 3]    # no convolution across 4 mm slices
    assert configs["site_a"].network.kernel_sizes[0] == [3, 3, 3]
    assert configs["site_c"].network.n_stages < configs["site_a"].network.n_stages
    # the merged fingerprint is still the plan's fingerprint (CT statistics come from it)
    assert plans.fingerprint["n_cases"] == sum(fp["n_cases"] for fp in preset_fingerprints)
    shared = _shared(plans)
    assert any(e["pool"] == "global" for e in shared["keys"].values())
    # the same fingerprints with fedavg: one common configuration
    from fedseg.planning.planner import make_plans

    common = make_plans(preset_fingerprints, strategy="fedavg")
    assert list(common.configurations) == ["3d_fullres"]
    assert all(info.configuration is None for info in common.sites.values())
    # a plan does not depend on the order the fingerprints come in
    assert _plans(preset_fingerprints[::-1]).plan_id == plans.plan_id


def test_aggregate_over_the_map(preset_fingerprints, tmp_path: Path):
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.round_zero import initial_round
    from fedseg.federation.site_update import write_site_update
    from fedseg.federation.weightfile import read_weight_file

    plans = _plans(preset_fingerprints, **{"training.rounds": "2"})
    plans = dataclasses.replace(plans, sites={**plans.sites, "site_b": dataclasses.replace(plans.sites["site_b"], n_cases=24)})
    initial_round(plans, tmp_path / "round_000")
    shared = _shared(plans)["sites"]
    states, updates = {}, []
    for i, site in enumerate(sorted(plans.sites)):
        state, _ = read_weight_file(tmp_path / "round_000" / f"{site}.safetensors")
        states[site] = {k: v + np.float32(i + 1) for k, v in state.items()}     # site k adds k+1 everywhere
        path = tmp_path / "round_001" / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, states[site], path, round_index=1, n_iterations=3)
        sent, meta = read_weight_file(path)
        assert set(sent) == set(shared[site])                    # only mapped tensors leave the site
        assert meta.scopes == {n: e["pool"] for n, e in shared[site].items()}
        updates.append(path)
    aggregate_round(plans, updates, tmp_path / "round_001")

    n = {site: plans.sites[site].n_cases for site in plans.sites}
    name = next(k for k, e in shared["site_a"].items() if e["pool"] == "global" and k.endswith("conv.weight"))
    out_a, _ = read_weight_file(tmp_path / "round_001" / "site_a.safetensors")
    assert set(out_a) == set(shared["site_a"])
    init, _ = read_weight_file(tmp_path / "round_000" / "site_a.safetensors")
    expected = init[name] + (1 * n["site_a"] + 2 * n["site_b"] + 3 * n["site_c"]) / sum(n.values())
    np.testing.assert_allclose(out_a[name], expected, rtol=1e-5, atol=1e-5)
    # a subset pool averages over its own sites only (site_b weighs 24 against site_c's 8)
    subset = next(k for k, e in shared["site_c"].items() if e["pool"] == "sites:site_b+site_c")
    out_c, _ = read_weight_file(tmp_path / "round_001" / "site_c.safetensors")
    init_c, _ = read_weight_file(tmp_path / "round_000" / "site_c.safetensors")
    expected = init_c[subset] + (2 * n["site_b"] + 3 * n["site_c"]) / (n["site_b"] + n["site_c"])
    np.testing.assert_allclose(out_c[subset], expected, rtol=1e-5, atol=1e-5)
    assert all(shared["site_a"][n]["pool"] != "sites:site_b+site_c" for n in out_a)   # site_a is no member
    global_model, meta = read_weight_file(tmp_path / "round_001" / "models" / "global.safetensors")
    assert all(e["pool"] == "global" for e in (v for s in shared.values() for v in s.values() if v["key"] in global_model))


def test_uniform_weighting(preset_fingerprints):
    from fedseg.federation.strategies.base import Contribution

    plans = _plans(preset_fingerprints, weighting="uniform")
    strategy = get_strategy("asymfedavg")
    contributions = [Contribution("site_a", 1, 1, np.zeros(3, np.float32)), Contribution("site_b", 9, 1, np.ones(3, np.float32))]
    np.testing.assert_allclose(strategy.combine(plans, "global", "k", contributions), 0.5)
    weighted = _plans(preset_fingerprints)
    np.testing.assert_allclose(strategy.combine(weighted, "global", "k", contributions), 0.9)


def test_inspect_shows_the_map(preset_fingerprints, tmp_path: Path):
    from fedseg.cli.inspect_view import summarise

    plans = _plans(preset_fingerprints)
    plans.save(tmp_path / "plans.json")
    summary = summarise(tmp_path / "plans.json")
    lines = summary["route table"]
    assert lines["pool global"].endswith("every member loads the merged tensor")
    assert set(k for k in lines if k.startswith("site ")) == {"site site_a", "site site_b", "site site_c"}
    assert "global" in summary["routes of site_a (by module)"]["encoder.stages.1"]
    assert "routes" not in summary      # the per-tensor table itself is not dumped


@pytest.mark.parametrize("decoder_match", ["output", "bottleneck"])
def test_every_site_of_the_preset_shares_decoder_tensors(preset_fingerprints, decoder_match):
    """On the fednnunet preset (site_c a stage shallower) matching from the output gives every
    site decoder tensors to pool; matching from the bottleneck leaves site_c without any."""
    shared = _shared(_plans(preset_fingerprints, decoder_match=decoder_match))["sites"]
    decoder = {site: [n for n in names if n.startswith("decoder.")] for site, names in shared.items()}
    if decoder_match == "output":
        assert all(len(names) >= 12 for names in decoder.values()), {s: len(n) for s, n in decoder.items()}
        assert shared["site_c"]["decoder.seg_layers.1.weight"] == shared["site_a"]["decoder.seg_layers.2.weight"]
    else:
        assert decoder["site_c"] == []


def test_a_thin_filter_derived_from_a_thick_one_answers_a_slice_as_the_thick_one_a_constant_volume():
    import torch

    from fedseg.federation.strategies.asymfedavg import derive_from_reference

    rng = np.random.default_rng(0)
    thick = rng.standard_normal((4, 2, 3, 3, 3)).astype(np.float32)
    thin = derive_from_reference(thick, (4, 2, 1, 3, 3))
    image = rng.standard_normal((1, 2, 1, 8, 8)).astype(np.float32)
    volume = np.repeat(image, 5, axis=2)                       # the same slice five times
    by_thick = torch.nn.functional.conv3d(torch.from_numpy(volume), torch.from_numpy(thick))[0, :, 1]
    by_thin = torch.nn.functional.conv3d(torch.from_numpy(image), torch.from_numpy(thin))[0, :, 0]
    np.testing.assert_allclose(by_thin.numpy(), by_thick.numpy(), rtol=1e-4, atol=1e-5)


def test_derived_tensors_keep_leading_channels_and_he_variance():
    from fedseg.federation.strategies.asymfedavg import derive_from_reference

    rng = np.random.default_rng(1)
    fan_in = 64 * 27
    wide = (rng.standard_normal((128, 64, 3, 3, 3)) * np.sqrt(2 / fan_in)).astype(np.float32)
    narrow = derive_from_reference(wide, (32, 16, 1, 3, 3))
    np.testing.assert_allclose(narrow, wide[:32, :16].sum(axis=2, keepdims=True) * 2.0, rtol=1e-5)   # sqrt(64/16)
    assert narrow.std() == pytest.approx(np.sqrt(2 / (16 * 9)), rel=0.05)                           # He for its own fan-in
    np.testing.assert_array_equal(derive_from_reference(np.arange(8.0), (3,)), [0.0, 1.0, 2.0])
    assert derive_from_reference(wide, (128, 64, 5, 3, 3)) is None      # wider than the reference
    assert derive_from_reference(wide, (128, 64, 2, 3, 3)) is None      # not a sum to extent 1


def test_aligned_initial_states_follow_the_largest_tensor_and_keep_the_rest():
    from fedseg.federation.strategies.asymfedavg import aligned_initial_states

    rng = np.random.default_rng(2)
    name = "encoder.stages.0.convs.0.conv.weight"
    states = {
        "a": {name: rng.standard_normal((4, 1, 3, 3, 3)).astype(np.float32), "other.weight": np.ones(3, np.float32)},
        "b": {name: rng.standard_normal((4, 1, 1, 3, 3)).astype(np.float32), "other.weight": np.zeros(3, np.float32)},
    }
    aligned = aligned_initial_states(states)
    np.testing.assert_array_equal(aligned["a"][name], states["a"][name])
    np.testing.assert_allclose(aligned["b"][name], states["a"][name].sum(axis=2, keepdims=True))
    np.testing.assert_array_equal(aligned["b"]["other.weight"], 0.0)   # no structural position: as built
    assert states["b"][name].shape == aligned["b"][name].shape


def test_aligned_init_can_be_switched_off_and_is_checked():
    strategy = get_strategy("asymfedavg")
    strategy.check_params({"aligned_init": False})
    with pytest.raises(InputError, match="aligned_init must be true or false"):
        strategy.check_params({"aligned_init": "yes"})


def test_match_inputs_pools_a_layer_only_where_its_inputs_are_pooled_alike():
    """iso's first stage differs in shape from the thick sites': with match_inputs every later
    layer of iso reads channels from filters no other site has, so iso pools nothing, while
    the two thick sites still pool their whole network."""
    iso = _config([32, 64, 64])
    thick = dataclasses.replace(iso, network=dataclasses.replace(iso.network, kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]]))
    manifests = {"iso": _manifest(iso), "thick": _manifest(thick), "thick2": _manifest(thick)}
    by_shape = shared_parameter_map(manifests)
    assert by_shape["sites"]["iso"]["encoder.stages.1.convs.0.conv.weight"]["pool"] == "global"
    strict = shared_parameter_map(manifests, match_inputs=True)
    assert strict["sites"]["iso"] == {}
    thick_names = [n for n in manifests["thick"] if structural_key(n) is not None]
    assert all(strict["sites"]["thick"][n]["pool"] == "sites:thick+thick2" for n in thick_names)
    feeds = input_layers(manifests["iso"])
    assert feeds["decoder.stages.0.convs.0"] == ("decoder.transpconvs.0", "encoder.stages.1.convs.1")
    assert feeds["decoder.transpconvs.0"] == ("encoder.stages.2.convs.1",)
    assert feeds["decoder.seg_layers.1"] == ("decoder.stages.1.convs.1",)
    assert "encoder.stages.0.convs.0" not in feeds

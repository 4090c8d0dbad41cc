"""The U-Net built from a plan: shapes, deep supervision, stage-structured names, seeded init."""

from __future__ import annotations

import re

import pytest
import torch

from fedseg.planning.plans import ConfigurationPlan, NetworkSpec
from fedseg.training.network import build_network, initial_state


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and avoids threads spinning on a shared CI core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_config(ndim: int = 3, features=(8, 16, 32), strides=None, patch=None, n_conv=2, deep_supervision=True) -> ConfigurationPlan:
    n = len(features)
    if strides is None:
        strides = [[1] * ndim] + [[2] * ndim] * (n - 1)
    return ConfigurationPlan(
        name="3d_fullres" if ndim == 3 else "2d",
        spacing=[1.0] * ndim,
        patch_size=list(patch or [16] * ndim),
        median_image_size_in_voxels=[16.0] * ndim,
        batch_size=2,
        normalization_schemes=["ZScoreNormalization"],
        use_mask_for_norm=[False],
        network=NetworkSpec(
            n_stages=n,
            features_per_stage=list(features),
            kernel_sizes=[[3] * ndim] * n,
            strides=[list(s) for s in strides],
            n_conv_per_stage=[n_conv] * n,
            n_conv_per_stage_decoder=[n_conv] * (n - 1),
            deep_supervision=deep_supervision,
        ),
    )


def test_3d_deep_supervision_outputs_highest_resolution_first():
    net = build_network(make_config(3), n_channels=2, n_classes=3, seed=0)
    out = net(torch.randn(2, 2, 16, 16, 16))
    assert isinstance(out, list)
    assert [tuple(o.shape) for o in out] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]


def test_deep_supervision_off_returns_one_full_resolution_tensor():
    net = build_network(make_config(3), n_channels=1, n_classes=2, seed=0)
    net.deep_supervision = False
    out = net(torch.randn(1, 1, 16, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 16, 16, 16)
    net2 = build_network(make_config(3, deep_supervision=False), 1, 2, seed=0)
    assert net2(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_anisotropic_strides_and_2d():
    cfg = make_config(3, features=(8, 16, 32, 32), strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], patch=[8, 32, 32])
    out = build_network(cfg, 1, 2, seed=0)(torch.randn(1, 1, 8, 32, 32))
    assert [tuple(o.shape[2:]) for o in out] == [(8, 32, 32), (8, 16, 16), (4, 8, 8)]
    out2d = build_network(make_config(2, features=(8, 16, 32, 64)), 3, 4, seed=0)(torch.randn(2, 3, 16, 16))
    assert [tuple(o.shape) for o in out2d] == [(2, 4, 16, 16), (2, 4, 8, 8), (2, 4, 4, 4)]


def test_parameter_names_are_structured_by_stage():
    net = build_network(make_config(3, features=(8, 16, 32)), n_channels=1, n_classes=3, seed=0)
    state = net.state_dict()
    pattern = re.compile(
        r"^(encoder\.stages\.\d+\.convs\.\d+\.(conv|norm)\.(weight|bias)"
        r"|decoder\.stages\.\d+\.convs\.\d+\.(conv|norm)\.(weight|bias)"
        r"|decoder\.transpconvs\.\d+\.(weight|bias)"
        r"|decoder\.seg_layers\.\d+\.(weight|bias))$"
    )
    assert all(pattern.match(k) for k in state), [k for k in state if not pattern.match(k)]
    # 3 encoder stages x 2 convs x (conv w,b + norm w,b) + 2 decoder stages x (transp w,b + 2 convs x 4 + seg w,b)
    assert len(state) == 3 * 2 * 4 + 2 * (2 + 2 * 4 + 2)
    assert state["encoder.stages.0.convs.0.conv.weight"].shape == (8, 1, 3, 3, 3)
    assert state["encoder.stages.2.convs.1.norm.weight"].shape == (32,)
    # decoder index 0 sits right after the bottleneck: 32 -> 16 channels, then back to 8
    assert state["decoder.transpconvs.0.weight"].shape == (32, 16, 2, 2, 2)
    assert state["decoder.stages.0.convs.0.conv.weight"].shape == (16, 32, 3, 3, 3)
    assert state["decoder.transpconvs.1.weight"].shape == (16, 8, 2, 2, 2)
    assert state["decoder.seg_layers.1.weight"].shape == (3, 8, 1, 1, 1)
    assert all(v.is_floating_point() for v in state.values())  # no integer buffers (InstanceNorm keeps no stats)


def test_decoder_stages_counted_from_bottleneck_match_across_depths():
    """Two networks of different depth share the shapes of their deepest decoder stage names."""
    deep = build_network(make_config(3, features=(8, 16, 32, 32)), 1, 2, seed=0).state_dict()
    shallow = build_network(make_config(3, features=(16, 32, 32)), 1, 2, seed=0).state_dict()
    assert deep["decoder.transpconvs.0.weight"].shape == shallow["decoder.transpconvs.0.weight"].shape
    assert deep["decoder.stages.0.convs.1.conv.weight"].shape == shallow["decoder.stages.0.convs.1.conv.weight"].shape


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    cfg = make_config(3)
    before = torch.get_rng_state()
    a = initial_state(cfg, 1, 2, seed=7)
    b = initial_state(cfg, 1, 2, seed=7)
    c = initial_state(cfg, 1, 2, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.stages.0.convs.0.conv.weight"], c["encoder.stages.0.convs.0.conv.weight"])


def test_nnunet_init():
    state = initial_state(make_config(3, features=(32, 64, 64)), 1, 2, seed=0)
    assert torch.count_nonzero(state["encoder.stages.1.convs.0.conv.bias"]) == 0
    assert torch.count_nonzero(state["decoder.transpconvs.0.bias"]) == 0
    assert torch.all(state["encoder.stages.1.convs.0.norm.weight"] == 1)
    w = state["encoder.stages.1.convs.1.conv.weight"]   # fan_in = 64 * 27; kaiming std = sqrt(2 / (1 + a^2) / fan_in)
    expected_std = (2.0 / (1 + 1e-4) / (64 * 27)) ** 0.5
    assert w.std().item() == pytest.approx(expected_std, rel=0.05)


def test_backward_reaches_every_parameter():
    net = build_network(make_config(3), 1, 2, seed=0)
    out = net(torch.randn(2, 1, 16, 16, 16))
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_bad_spec_is_rejected():
    cfg = make_config(3)
    cfg.network.n_conv_per_stage_decoder = [2]
    with pytest.raises(ValueError, match="n_conv_per_stage_decoder"):
        build_network(cfg, 1, 2)

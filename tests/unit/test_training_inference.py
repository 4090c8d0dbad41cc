"""Sliding-window inference: tiling, Gaussian weighting, mirroring, 2D slices, original geometry."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedseg.training.inference import (
    compute_steps_for_sliding_window,
    gaussian_importance_map,
    inference_mode,
    sliding_window_probabilities,
)


# -- stand-in networks ----------------------------------------------------------------------

class ConstantClass(nn.Module):
    """Logits strongly favouring one class everywhere; a list under deep supervision."""

    def __init__(self, n_classes: int, winner: int, ndim: int = 3) -> None:
        super().__init__()
        self.n_classes, self.winner, self.ndim = n_classes, winner, ndim
        self.deep_supervision = True
        self.seen_deep_supervision: list[bool] = []
        self.seen_training: list[bool] = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor):
        assert x.ndim == self.ndim + 2
        self.seen_deep_supervision.append(self.deep_supervision)
        self.seen_training.append(self.training)
        logits = torch.zeros((x.shape[0], self.n_classes, *x.shape[2:]), dtype=x.dtype, device=x.device)
        logits[:, self.winner] = 10.0
        out = logits + self.dummy
        # Deep supervision would return a list, lower resolutions after the first.
        return [out, out[(slice(None), slice(None), *[slice(None, None, 2)] * self.ndim)]] if self.deep_supervision else out


def pointwise_net(n_channels: int, n_classes: int, ndim: int, seed: int = 0) -> nn.Module:
    """A 1x1 convolution: voxel-wise, so any tiling must give exactly the whole-image result."""
    torch.manual_seed(seed)
    conv = (nn.Conv3d if ndim == 3 else nn.Conv2d)(n_channels, n_classes, 1)
    net = nn.Sequential(conv)
    net.deep_supervision = False
    return net


def context_net(n_channels: int, n_classes: int, seed: int = 0) -> nn.Module:
    """A 3x3x3 convolution with random (asymmetric) weights: not flip-equivariant by itself."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(n_channels, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, n_classes, 3, padding=1))
    net.deep_supervision = False
    return net


def direct_softmax(net: nn.Module, data: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(net(torch.from_numpy(data)[None]), 1)[0].numpy()


# -- tiling -----------------------------------------------------------------------------------

def test_steps_follow_nnunet_rule():
    assert compute_steps_for_sliding_window((10,), (4,), 0.5) == [[0, 2, 4, 6]]
    # 11 voxels: 5 tiles with the step spread evenly (7 / 4 = 1.75, rounded)
    assert compute_steps_for_sliding_window((11,), (4,), 0.5) == [[0, 2, 4, 5, 7]]
    assert compute_steps_for_sliding_window((4, 9), (4, 4), 0.5) == [[0], [0, 2, 3, 5]]
    assert compute_steps_for_sliding_window((12,), (4,), 1.0) == [[0, 4, 8]]
    with pytest.raises(ValueError):
        compute_steps_for_sliding_window((3,), (4,), 0.5)


@pytest.mark.parametrize("size, tile, step", [(37, 16, 0.5), (16, 16, 0.5), (50, 12, 0.25), (23, 8, 1.0)])
def test_tiles_cover_every_voxel_with_bounded_step(size, tile, step):
    (starts,) = compute_steps_for_sliding_window((size,), (tile,), step)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= math.ceil(tile * step) for a, b in zip(starts, starts[1:]))


# -- Gaussian ---------------------------------------------------------------------------------

def test_gaussian_map_peaks_at_centre_and_has_sigma_of_an_eighth_patch():
    patch = (17, 24, 32)
    g = gaussian_importance_map(patch)
    assert g.shape == patch and g.dtype == np.float32
    centre = tuple(p // 2 for p in patch)
    assert g[centre] == pytest.approx(1.0) and g.max() == pytest.approx(1.0)
    assert (g > 0).all()
    for axis, p in enumerate(patch):
        sigma = p / 8
        for d in (1, 2, 3):
            index = list(centre)
            index[axis] += d
            assert g[tuple(index)] == pytest.approx(math.exp(-(d**2) / (2 * sigma**2)), rel=1e-3)
    # Symmetric about the centre on an odd axis.
    assert np.allclose(g[centre[0] - 5], g[centre[0] + 5])


def test_gaussian_map_has_no_zero_weights_even_far_from_centre():
    # sigma = 1 voxel on a 64-voxel tile: the corners underflow to 0 in float64 before the clamp.
    g = gaussian_importance_map((64, 64), sigma_scale=1 / 64)
    assert g.min() > 0
    assert g[0, 0] == g.min()  # clamped to the smallest positive weight, not left at 0
    # Dividing accumulated weights never meets a zero, even for a voxel only a corner covers.
    assert np.isfinite(1.0 / g).all()


# -- sliding window ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape, patch", [((11, 23, 17), (8, 8, 8)), ((5, 6, 7), (8, 8, 8)), ((8, 8, 8), (8, 8, 8))])
def test_pointwise_network_equals_whole_image_prediction(shape, patch):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    net = pointwise_net(2, 3, 3)
    probs = sliding_window_probabilities(net, data, patch, 3)
    assert probs.shape == (3, *shape) and probs.dtype == np.float32
    # The Gaussian weights cancel out: every tile agrees on every voxel.
    np.testing.assert_allclose(probs, direct_softmax(net, data), atol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_constant_network_gives_that_class_everywhere_and_handles_deep_supervision():
    net = ConstantClass(n_classes=3, winner=2)
    net.train()
    data = np.random.default_rng(1).normal(size=(1, 9, 13, 10)).astype(np.float32)
    with inference_mode(net):
        probs = sliding_window_probabilities(net, data, (6, 6, 6), 3, tiles_per_batch=3)
    assert (probs.argmax(0) == 2).all()
    # During inference: eval mode and no deep supervision; afterwards: restored.
    assert net.seen_deep_supervision and not any(net.seen_deep_supervision)
    assert not any(net.seen_training)
    assert net.deep_supervision is True and net.training is True


def test_wrong_number_of_classes_is_reported():
    with pytest.raises(ValueError, match="classes"):
        sliding_window_probabilities(pointwise_net(1, 2, 3), np.zeros((1, 4, 4, 4), np.float32), (4, 4, 4), 3)


def test_mirroring_makes_prediction_flip_equivariant():
    rng = np.random.default_rng(2)
    # 11 voxels with patch 7 -> starts [0, 2, 4]: a mirror-symmetric tiling with an odd
    # (so mirror-symmetric) Gaussian, so flips commute with the tiling.
    data = rng.normal(size=(1, 11, 11, 11)).astype(np.float32)
    net = context_net(1, 2)
    patch = (7, 7, 7)
    for axes in [(1,), (2, 3), (1, 2, 3)]:
        flipped_input = np.ascontiguousarray(np.flip(data, axes))
        with_mirror = sliding_window_probabilities(net, flipped_input, patch, 2, mirror=True)
        reference = np.flip(sliding_window_probabilities(net, data, patch, 2, mirror=True), axes)
        np.testing.assert_allclose(with_mirror, reference, atol=1e-5)
    # Without mirroring the same network is not equivariant (the test above has teeth).
    plain = sliding_window_probabilities(net, np.ascontiguousarray(np.flip(data, 3)), patch, 2)
    assert not np.allclose(plain, np.flip(sliding_window_probabilities(net, data, patch, 2), 3), atol=1e-3)


def test_mirroring_averages_all_flips():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(1, 8, 8, 8)).astype(np.float32)
    net = context_net(1, 2, seed=4)
    expected = np.zeros((2, 8, 8, 8), np.float32)
    combos = [c for r in range(4) for c in itertools.combinations((1, 2, 3), r)]
    for axes in combos:
        flipped = np.ascontiguousarray(np.flip(data, axes)) if axes else data
        expected += np.flip(direct_softmax(net, flipped), axes) if axes else direct_softmax(net, flipped)
    expected /= len(combos)
    got = sliding_window_probabilities(net, data, (8, 8, 8), 2, mirror=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_2d_patch_predicts_each_slice_with_the_2d_network():
    rng = np.random.default_rng(5)
    data = rng.normal(size=(2, 4, 13, 9)).astype(np.float32)
    net = pointwise_net(2, 3, ndim=2)
    probs = sliding_window_probabilities(net, data, (8, 8), 3, mirror=True)
    assert probs.shape == (3, 4, 13, 9)
    for z in range(4):
        np.testing.assert_allclose(probs[:, z], direct_softmax(net, data[:, z]), atol=1e-5)
    # A 2D network that sees slice content: constant class per slice is kept per slice.
    const = ConstantClass(n_classes=3, winner=1, ndim=2)
    with inference_mode(const):
        assert (sliding_window_probabilities(const, data, (8, 8), 3).argmax(0) == 1).all()


# -- end to end: real files, non-target spacing, original geometry back ----------------------

from fedseg.data.case_loading import CaseData, load_case  # noqa: E402
from fedseg.data.dataset import Case  # noqa: E402
from fedseg.data.image_io import Geometry, read_image, write_image  # noqa: E402
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, StrategySpec  # noqa: E402
from fedseg.training.inference import predict_case, predict_folder  # noqa: E402

ORIGINAL_SPACING = (3.0, 0.8, 0.9)  # (z, y, x): anisotropic, and not the plan's spacing
ORIGINAL_SHAPE = (10, 30, 28)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def make_plans(labels: dict[str, int], two_d: bool = False) -> tuple[Plans, ConfigurationPlan]:
    ndim = 2 if two_d else 3
    spec = NetworkSpec(
        n_stages=2,
        features_per_stage=[4, 8],
        kernel_sizes=[[3] * ndim] * 2,
        strides=[[1] * ndim, [2] * ndim],
        n_conv_per_stage=[1, 1],
        n_conv_per_stage_decoder=[1],
    )
    config = ConfigurationPlan(
        name="2d" if two_d else "3d_fullres",
        spacing=[1.2, 1.2] if two_d else [1.5, 1.2, 1.2],
        patch_size=[16, 16] if two_d else [8, 16, 16],
        median_image_size_in_voxels=[20, 20] if two_d else [20, 20, 20],
        batch_size=2,
        normalization_schemes=["ZScoreNormalization"],
        use_mask_for_norm=[False],
        network=spec,
    )
    plans = Plans(
        dataset_name="test",
        channel_names={"0": "MRI"},
        labels=labels,
        file_ending=".nii.gz",
        fingerprint={},
        sites={},
        strategy=StrategySpec("fedavg"),
        configurations={config.name: config},
        default_configuration=config.name,
    )
    return plans, config


def bright_cube_case(tmp_path, name: str = "case1", frame: int = 0) -> tuple[Case, np.ndarray, Geometry]:
    """A noisy image with a bright box, written to disk; returns the case and the true box mask."""
    rng = np.random.default_rng(11)
    image = rng.uniform(5.0, 15.0, size=ORIGINAL_SHAPE).astype(np.float32)
    truth = np.zeros(ORIGINAL_SHAPE, bool)
    truth[3:7, 8:20, 10:22] = True
    image[truth] = 100.0
    if frame:
        image[:, :frame] = 0.0
        image[:, :, :frame] = 0.0
    geometry = Geometry(ORIGINAL_SHAPE, ORIGINAL_SPACING, (10.0, -5.0, 2.5), DIRECTION, False)
    path = tmp_path / "images" / f"{name}_0000.nii.gz"
    write_image(image, geometry, path)
    return Case(name, (path,), None), truth, geometry


def threshold_net(ndim: int) -> nn.Module:
    """Foreground where the z-scored intensity passes 1.7: halfway between the noise (about 0)
    and the bright box (about 3.7) of `bright_cube_case`, so interpolated borders split evenly."""
    conv = (nn.Conv3d if ndim == 3 else nn.Conv2d)(1, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1] = 20.0
        conv.bias[1] = -20.0 * 1.7
    net = nn.Sequential(conv)
    net.deep_supervision = True  # must be switched off and restored by predict_case
    return net


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_constant_network_gives_its_label_value_everywhere_in_original_geometry(tmp_path):
    plans, config = make_plans({"background": 0, "tumour": 3})
    case, _, geometry = bright_cube_case(tmp_path)
    case_data = load_case(case)
    assert case_data.geometry.spacing == pytest.approx(ORIGINAL_SPACING)
    seg = predict_case(ConstantClass(n_classes=2, winner=1), case_data, plans, config)
    assert seg.shape == ORIGINAL_SHAPE and seg.dtype == np.int16
    assert (seg == 3).all()  # class index 1 -> label value 3


def test_outside_the_nonzero_region_is_background(tmp_path):
    plans, config = make_plans({"background": 0, "tumour": 3})
    case, _, _ = bright_cube_case(tmp_path, frame=4)
    seg = predict_case(ConstantClass(n_classes=2, winner=1), load_case(case), plans, config)
    assert seg.shape == ORIGINAL_SHAPE
    assert (seg[:, :4] == 0).all() and (seg[:, :, :4] == 0).all()
    assert (seg[:, 4:, 4:] == 3).all()


@pytest.mark.parametrize("two_d", [False, True])
@pytest.mark.parametrize("mirror", [False, True])
def test_predict_case_recovers_a_structure_in_original_geometry(tmp_path, two_d, mirror):
    plans, config = make_plans({"background": 0, "lesion": 1}, two_d=two_d)
    case, truth, _ = bright_cube_case(tmp_path)
    net = threshold_net(2 if two_d else 3)
    net.train()
    seg = predict_case(net, load_case(case), plans, config, mirror=mirror)
    assert seg.shape == ORIGINAL_SHAPE
    assert set(np.unique(seg).tolist()) <= {0, 1}
    # Resampling to 1.5/1.2 mm and back blurs the border by about a voxel, no more.
    assert dice(seg == 1, truth) > 0.9
    assert net.deep_supervision is True and net.training is True


def test_predict_case_rejects_wrong_channel_count(tmp_path):
    from fedseg.errors import InputError

    plans, config = make_plans({"background": 0, "lesion": 1})
    case, _, geometry = bright_cube_case(tmp_path)
    data = load_case(case)
    two_channels = CaseData(data.case_id, np.concatenate([data.data, data.data]), None, data.geometry)
    with pytest.raises(InputError, match="channel"):
        predict_case(threshold_net(3), two_channels, plans, config)


def test_predict_folder_writes_label_maps_in_each_inputs_geometry(tmp_path):
    plans, config = make_plans({"background": 0, "lesion": 1})
    _, truth, geometry = bright_cube_case(tmp_path, "alpha")
    bright_cube_case(tmp_path, "beta", frame=3)
    out_dir = tmp_path / "pred"
    seen = []
    written = predict_folder(
        threshold_net(3), tmp_path / "images", out_dir, plans, config, progress=lambda n=1, info="": seen.append(info)
    )
    assert written == [out_dir / "alpha.nii.gz", out_dir / "beta.nii.gz"]
    assert seen == ["alpha", "beta"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["alpha.nii.gz", "beta.nii.gz"]  # no temp files left
    seg, out_geo = read_image(out_dir / "alpha.nii.gz")
    assert out_geo.shape == ORIGINAL_SHAPE
    assert out_geo.spacing == pytest.approx(geometry.spacing)
    assert out_geo.origin == pytest.approx(geometry.origin)
    assert out_geo.direction == pytest.approx(geometry.direction)
    assert dice(seg == 1, truth) > 0.9


def test_predict_folder_names_a_folder_without_cases(tmp_path):
    from fedseg.errors import InputError

    plans, config = make_plans({"background": 0, "lesion": 1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no cases"):
        predict_folder(threshold_net(3), tmp_path / "empty", tmp_path / "out", plans, config)


def test_the_plan_network_runs_through_predict_case(tmp_path):
    from fedseg.training.network import build_network

    plans, config = make_plans({"background": 0, "lesion": 1})
    net = build_network(config, plans.n_channels, plans.n_classes)
    assert net.deep_supervision is True
    case, _, _ = bright_cube_case(tmp_path)
    seg = predict_case(net, load_case(case), plans, config, mirror=True)
    assert seg.shape == ORIGINAL_SHAPE and set(np.unique(seg).tolist()) <= {0, 1}
    assert net.deep_supervision is True and net.training is True


def test_ensemble_averages_softmax_in_original_geometry_and_saves_probabilities(tmp_path):
    """A 3D and a 2D model (different grids) ensembled: the npz holds the mean of the members'
    probabilities in the image's geometry, and the label map is its argmax."""
    from fedseg.training.inference import EnsembleMember, predict_case_probabilities, predict_folder_ensemble
    from fedseg.training.postprocessing import PostprocessingDecision

    plans3, config3 = make_plans({"background": 0, "lesion": 1})
    plans2, config2 = make_plans({"background": 0, "lesion": 1}, two_d=True)
    _, truth, _ = bright_cube_case(tmp_path, "alpha")
    members = [EnsembleMember(threshold_net(3), plans3, config3), EnsembleMember(ConstantClass(2, 0, ndim=2), plans2, config2)]
    out = tmp_path / "pred"
    predict_folder_ensemble(members, tmp_path / "images", out, save_probabilities=True,
                            postprocessing=PostprocessingDecision(largest_foreground=True))
    with np.load(out / "alpha.npz") as saved:
        probs = saved["probabilities"]
    case = load_case(Case("alpha", (tmp_path / "images" / "alpha_0000.nii.gz",), None))
    single = [predict_case_probabilities(m.network, case, m.plans, m.config) for m in members]
    assert probs.shape == (2, *ORIGINAL_SHAPE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, (single[0] + single[1]) / 2, atol=1e-6)
    seg, _ = read_image(out / "alpha.nii.gz")
    np.testing.assert_array_equal(seg, np.argmax(probs, axis=0))
    # the constant-background member halves the threshold net's confidence: still the box
    assert dice(seg == 1, truth) > 0.8

"""nnU-Net's plain convolutional U-Net (PlainConvUNet), 2D and 3D, built from a plan.

Parameter names are part of the file protocol: aggregation pairs tensors by name, and
asymmetric averaging matches encoder stages counted from the input and decoder stages by
resolution level counted from the output (or, on request, from the bottleneck: the indexing
below). So the layout is fixed and stage-structured:

    encoder.stages.{s}.convs.{i}.conv.weight / .bias      s = 0 is the full-resolution stage
    encoder.stages.{s}.convs.{i}.norm.weight / .bias
    decoder.transpconvs.{j}.weight / .bias                 j = 0 is right after the bottleneck
    decoder.stages.{j}.convs.{i}.conv.weight / ...
    decoder.seg_layers.{j}.weight / .bias                  1x1 head of decoder stage j

InstanceNorm keeps no running statistics (as nnU-Net), so the state dict holds only float
parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from fedseg.planning.plans import ConfigurationPlan, NetworkSpec

# nnU-Net's normalisation and nonlinearity settings (nnUNetPlanner defaults).
NORM_EPS = 1e-5
LEAKY_SLOPE = 1e-2
# nnU-Net's InitWeights_He(neg_slope=1e-2): kaiming normal with the LeakyReLU slope.
INIT_NEG_SLOPE = 1e-2


def _conv_ops(ndim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if ndim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d
    if ndim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d
    raise ValueError(f"only 2D and 3D networks are supported, not {ndim}D")


class ConvNormNonlin(nn.Module):
    """Conv -> InstanceNorm(affine) -> LeakyReLU, nnU-Net's ConvDropoutNormReLU without dropout."""

    def __init__(self, ndim: int, in_ch: int, out_ch: int, kernel: list[int], stride: list[int]) -> None:
        super().__init__()
        conv, _, norm = _conv_ops(ndim)
        self.conv = conv(in_ch, out_ch, tuple(kernel), tuple(stride), padding=tuple(k // 2 for k in kernel), bias=True)
        self.norm = norm(out_ch, eps=NORM_EPS, affine=True)
        self.nonlin = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class StackedConvs(nn.Module):
    """n x ConvNormNonlin; only the first conv carries the stage's stride (downsampling by strided conv)."""

    def __init__(self, ndim: int, n_convs: int, in_ch: int, out_ch: int, kernel: list[int], stride: list[int]) -> None:
        super().__init__()
        ones = [1] * ndim
        self.convs = nn.Sequential(
            *[
                ConvNormNonlin(ndim, in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else ones)
                for i in range(n_convs)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Encoder(nn.Module):
    def __init__(self, spec: NetworkSpec, ndim: int, n_channels: int) -> None:
        super().__init__()
        stages = []
        in_ch = n_channels
        for s in range(spec.n_stages):
            out_ch = spec.features_per_stage[s]
            stages.append(StackedConvs(ndim, spec.n_conv_per_stage[s], in_ch, out_ch, spec.kernel_sizes[s], spec.strides[s]))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Decoder stages indexed from the bottleneck up: j = 0 upsamples the bottleneck."""

    def __init__(self, spec: NetworkSpec, ndim: int, n_classes: int) -> None:
        super().__init__()
        conv, transp, _ = _conv_ops(ndim)
        n = spec.n_stages
        transpconvs, stages, seg_layers = [], [], []
        for j in range(n - 1):
            below = spec.features_per_stage[n - 1 - j]      # channels coming up from the deeper stage
            skip = spec.features_per_stage[n - 2 - j]       # channels of the matching encoder stage
            stride = spec.strides[n - 1 - j]
            # nnU-Net: transposed conv with kernel = stride, bias on (conv_bias=True in its plans).
            transpconvs.append(transp(below, skip, tuple(stride), tuple(stride), bias=True))
            stages.append(
                StackedConvs(ndim, spec.n_conv_per_stage_decoder[j], 2 * skip, skip, spec.kernel_sizes[n - 2 - j], [1] * ndim)
            )
            seg_layers.append(conv(skip, n_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool) -> list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        n_dec = len(self.stages)
        for j in range(n_dec):
            x = self.transpconvs[j](x)
            x = torch.cat((x, skips[-(j + 2)]), dim=1)
            x = self.stages[j](x)
            if deep_supervision or j == n_dec - 1:
                outputs.append(self.seg_layers[j](x))
        return outputs[::-1]  # highest resolution first


class PlainConvUNet(nn.Module):
    """U-Net whose `forward` returns a list (highest resolution first) when `deep_supervision` is True."""

    def __init__(self, spec: NetworkSpec, ndim: int, n_channels: int, n_classes: int) -> None:
        super().__init__()
        check_spec(spec, ndim)
        self.spec = spec
        self.ndim = ndim
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.deep_supervision = bool(spec.deep_supervision)
        self.encoder = Encoder(spec, ndim, n_channels)
        self.decoder = Decoder(spec, ndim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = self.decoder(self.encoder(x), self.deep_supervision)
        return outputs if self.deep_supervision else outputs[0]


def check_spec(spec: NetworkSpec, ndim: int) -> None:
    """ValueError unless `spec` describes a U-Net of `ndim` dimensions (at least 2 stages,
    one entry per stage in every per-stage list, kernels and strides of `ndim` entries)."""
    n = spec.n_stages
    if n < 2:
        raise ValueError("a U-Net needs at least 2 stages")
    for field, want in (
        ("features_per_stage", n),
        ("kernel_sizes", n),
        ("strides", n),
        ("n_conv_per_stage", n),
        ("n_conv_per_stage_decoder", n - 1),
    ):
        if len(getattr(spec, field)) != want:
            raise ValueError(f"network.{field} has {len(getattr(spec, field))} entries, expected {want}")
    for field in ("kernel_sizes", "strides"):
        for entry in getattr(spec, field):
            if len(entry) != ndim:
                raise ValueError(f"network.{field} entry {entry} does not match the {ndim}D patch")


def init_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """nnU-Net's InitWeights_He(1e-2): kaiming normal for (transposed) convs, zero bias; norms stay 1/0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=INIT_NEG_SLOPE, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_network(config: ConfigurationPlan, n_channels: int, n_classes: int, seed: int | None = None) -> PlainConvUNet:
    """The plan's network; `seed` makes the initial weights deterministic without touching torch's global RNG."""
    ndim = config.ndim
    if seed is None:
        net = PlainConvUNet(config.network, ndim, n_channels, n_classes)
        init_weights(net)
        return net
    # Module constructors draw their default init from the global RNG; fork it so building a
    # seeded network leaves the caller's random stream as it was.
    with torch.random.fork_rng(devices=[]):
        net = PlainConvUNet(config.network, ndim, n_channels, n_classes)
    init_weights(net, torch.Generator().manual_seed(int(seed)))
    return net


def initial_state(config: ConfigurationPlan, n_channels: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """The deterministic initial weights for a plan (same seed -> bit-identical tensors)."""
    net = build_network(config, n_channels, n_classes, seed=seed)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}

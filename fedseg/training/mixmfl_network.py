"""MDM-MixMFL's network: modality-tailored encoders, a modality-shared encoder, a decoupler and a
prototype memory in front of nnU-Net's decoder.

For a site holding the plan's sequences `present` (indices into the plan's channel list; the
input always has every plan channel, absent ones zero and ignored):

- `tailored.<seq>`: one encoder per sequence (1 input channel), only run for present ones;
- `shared`:        one encoder (1 input channel) run on every present sequence; the shared
                   representation at each stage is the mean over the present sequences
                   (order-free and defined for any number of sequences);
- `memory.<seq>.<s>`: per sequence and encoder stage s a buffer of prototypes
                   (fedseg.training.prototype_memory); at every stage a missing sequence's
                   tailored representation is retrieved from its memory by cosine
                   similarity between the site's representations (queries: the shared one
                   and the tailored one of each sequence it holds) and the prototypes' keys
                   in the same space, a softmax over similarities weighting their values.
                   Every stage has its own memory because the decoder reads every stage
                   (skip connections): a bottleneck-only memory leaves the fine stages,
                   which carry the boundaries, with zeros where the sequence is missing;
- `fuse.<s>`:      per stage a 1x1 conv-norm-nonlin from [shared, tailored of every sequence
                   in plan order] to the plan's width of that stage, so the unchanged
                   nnU-Net `decoder` (same parameter names as the plain U-Net) decodes it;
- `decoupler.classifier`: modality classifier on the statistics of each encoder's bottleneck
                   representation taken before its last InstanceNorm (per channel: spatial
                   mean and Gaussian entropy; tailored as is, shared through a gradient-
                   reversal layer). After the norm every channel has mean ~0 and variance ~1
                   whatever the sequence, so pooled normalised features carry almost no
                   modality; the pre-norm statistics are what the norm removes;
  `decoupler.fusion`: the pair-wise fusion of the entropy triplet loss, a plain convolution
                   (no norm), so that its output's variance, and so its entropy, can move.

Decoupling representations ("raw"): the bottleneck output of each encoder's last convolution
before its InstanceNorm. The paper models representations as Gaussians whose entropy
½·log(2πeσ²) follows their variance; after InstanceNorm + LeakyReLU every channel's variance
is fixed by the norm (entropy ≈ 0.886 for any input, noise included), so a triplet loss on
those features cannot move.

Encoder branches are half the plan's width (BRANCH_DIVISOR): a site runs 2·|present| encoder
passes, so the encoder cost stays near one plain U-Net's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedseg.planning.plans import ConfigurationPlan, NetworkSpec
from fedseg.training.network import ConvNormNonlin, Decoder, Encoder, check_spec, init_weights
from fedseg.training.prototype_memory import (
    KEY_SOURCE_COLUMN,
    META_COLUMNS,
    SHARED_KEY,
    memory_width,
    tailored_key,
)
from fedseg.training.recipes.params import MEMORY_QUERIES

# Each encoder branch has half the plan's features per stage: two encoders per present
# sequence then cost about what one plain U-Net encoder costs on a two-sequence site.
BRANCH_DIVISOR = 2
MIN_BRANCH_FEATURES = 8
# Softmax temperature of memory retrieval over cosine similarities in [-1, 1]: 0.1 lets the
# few most similar prototypes dominate while keeping retrieval differentiable in the query.
RETRIEVAL_TEMPERATURE = 0.1
# Default memory capacity per sequence (the paper's 200 slots).
DEFAULT_MEMORY_SIZE = 200
# Variance floor of the entropy of a (near-)constant feature channel.
ENTROPY_EPS = 1e-6


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; gradient multiplied by -scale backward (the GRL of domain adaptation)."""
    return _GradientReversal.apply(x, float(scale))


def entropy_profile(features: torch.Tensor) -> torch.Tensor:
    """(B, D, *spatial) -> (B, D): Gaussian entropy 0.5·log(2πe·σ²) of each channel over space."""
    var = features.flatten(2).var(dim=-1, unbiased=False)
    return 0.5 * torch.log(2 * math.pi * math.e * (var + ENTROPY_EPS))


def modality_statistics(raw: torch.Tensor) -> torch.Tensor:
    """(B, D, *spatial) -> (B, 2D): per channel the spatial mean and the Gaussian entropy of a
    pre-norm representation: what the classifier tells sequences apart by."""
    return torch.cat((raw.flatten(2).mean(-1), entropy_profile(raw)), dim=1)


def entropy_triplet_loss(
    anchors: Sequence[torch.Tensor], positives: Sequence[torch.Tensor], negatives: Sequence[torch.Tensor], margin: float
) -> torch.Tensor:
    """MDM-MixMFL's triplet loss on information entropy, per sample, averaged over the batch.

    d(a, b) = ‖H(a) − H(b)‖₂ / √D between the per-channel entropy profiles of two
    representations; loss = max(0, max_{a,p} d(a, p) − min_{a,n} d(a, n) + margin): the
    farthest positive (fused shared+shared) must be closer to the anchors (shared) than the
    nearest negative (fused shared+tailored), by the margin.
    """
    a = torch.stack([entropy_profile(t) for t in anchors])     # (Na, B, D)
    p = torch.stack([entropy_profile(t) for t in positives])   # (Np, B, D)
    n = torch.stack([entropy_profile(t) for t in negatives])   # (Nn, B, D)
    scale = math.sqrt(a.shape[-1])
    d_ap = (a[:, None] - p[None]).norm(dim=-1) / scale         # (Na, Np, B)
    d_an = (a[:, None] - n[None]).norm(dim=-1) / scale
    d_max = d_ap.flatten(0, 1).amax(0)
    d_min = d_an.flatten(0, 1).amin(0)
    return F.relu(d_max - d_min + margin).mean()


def retrieve(
    memory: torch.Tensor, queries: Mapping[int, torch.Tensor], temperature: float = RETRIEVAL_TEMPERATURE
) -> torch.Tensor:
    """Pseudo representation (B, D, *spatial) of a missing sequence from its memory.

    `queries` maps a key source (prototype_memory.SHARED_KEY, or tailored_key(q) for a
    sequence q the site holds) to the site's representation in that space, all (B, D,
    *spatial). Per voxel: one softmax over every filled prototype whose key is in one of
    those spaces, of cos(query of that space, key) / temperature, times their values. No
    such prototype (an empty memory in round 1) gives zeros: the sequence is then absent.
    """
    reference = next(iter(queries.values()))
    dim = reference.shape[1]
    filled = memory[:, 0] >= 1
    logits, values = [], []
    for source, query in sorted(queries.items()):
        rows = memory[filled & (memory[:, KEY_SOURCE_COLUMN] == source)]
        if not len(rows):
            continue
        rows = rows.to(query.dtype)
        keys = rows[:, META_COLUMNS:META_COLUMNS + dim]
        q = F.normalize(query.flatten(2).transpose(1, 2), dim=-1)        # (B, N, D)
        logits.append(q @ F.normalize(keys, dim=-1).T / temperature)     # (B, N, rows)
        values.append(rows[:, META_COLUMNS + dim:META_COLUMNS + 2 * dim])
    if not logits:
        return torch.zeros_like(reference)
    weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    out = weights @ torch.cat(values)                                    # (B, N, D)
    return out.transpose(1, 2).reshape(reference.shape)


def encode_keeping_raw(encoder: Encoder, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The encoder's skips (as `encoder(x)`) and its bottleneck before the last InstanceNorm."""
    skips = [x]
    for stage in encoder.stages[:-1]:
        skips.append(stage(skips[-1]))
    *first, last = encoder.stages[-1].convs
    h = skips[-1]
    for block in first:
        h = block(h)
    raw = last.conv(h)
    skips.append(last.nonlin(last.norm(raw)))
    return skips[1:], raw


class MixMFLNet(nn.Module):
    """Mix-modal U-Net; `forward(x)` as the plain U-Net, `forward(x, return_aux=True)` adds features."""

    def __init__(
        self,
        spec: NetworkSpec,
        ndim: int,
        sequence_keys: Sequence[str],
        n_classes: int,
        present: Sequence[int] | None = None,
        memory_size: int = DEFAULT_MEMORY_SIZE,
        use_memory: bool = True,
        memory_query: str = "both",
    ) -> None:
        super().__init__()
        check_spec(spec, ndim)
        self.spec = spec
        self.ndim = ndim
        self.sequence_keys = list(sequence_keys)
        self.n_channels = len(self.sequence_keys)
        self.n_classes = n_classes
        self.present = sorted(range(self.n_channels) if present is None else {int(i) for i in present})
        if not self.present or any(not 0 <= i < self.n_channels for i in self.present):
            raise ValueError(f"present sequences {list(present or [])} must be a non-empty subset of 0..{self.n_channels - 1}")
        self.use_memory = bool(use_memory)
        if memory_query not in MEMORY_QUERIES:
            raise ValueError(f"memory_query must be one of {', '.join(MEMORY_QUERIES)}, got {memory_query!r}")
        self.memory_query = memory_query
        self.deep_supervision = bool(spec.deep_supervision)

        branch = [max(MIN_BRANCH_FEATURES, f // BRANCH_DIVISOR) for f in spec.features_per_stage]
        branch_spec = dataclasses.replace(spec, features_per_stage=branch)
        self.feature_dim = branch[-1]
        self.tailored = nn.ModuleDict({key: Encoder(branch_spec, ndim, 1) for key in self.sequence_keys})
        self.shared = Encoder(branch_spec, ndim, 1)
        ones = [1] * ndim
        self.fuse = nn.ModuleList(
            [ConvNormNonlin(ndim, (1 + self.n_channels) * b, f, ones, ones) for b, f in zip(branch, spec.features_per_stage)]
        )
        self.decoder = Decoder(spec, ndim, n_classes)
        d = self.feature_dim
        self.decoupler = nn.Module()
        self.decoupler.classifier = nn.Sequential(nn.Linear(2 * d, d), nn.LeakyReLU(1e-2), nn.Linear(d, self.n_channels))
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.decoupler.fusion = conv(2 * d, d, 3, 1, 1, bias=True)
        # memory.<seq>.<stage>: one prototype memory per sequence and encoder stage
        self.memory = nn.ModuleDict()
        for key in self.sequence_keys:
            per_stage = nn.Module()
            for s, width in enumerate(branch):
                per_stage.register_buffer(str(s), torch.zeros(int(memory_size), memory_width(width)))
            self.memory[key] = per_stage

    # -- pieces used by the trainer ------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.fuse)

    def memory_of(self, index: int, stage: int) -> torch.Tensor:
        return getattr(self.memory[self.sequence_keys[index]], str(stage))

    def set_memory(self, index: int, stage: int, value: torch.Tensor) -> None:
        self.memory_of(index, stage).copy_(value)

    def classify(self, raw: torch.Tensor) -> torch.Tensor:
        """Modality logits (B, n_channels) of pre-norm bottleneck representations (B, D, *spatial)."""
        return self.decoupler.classifier(modality_statistics(raw))

    def fuse_pair(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.decoupler.fusion(torch.cat((a, b), dim=1))

    # -- forward -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[torch.Tensor]], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(tailored, shared) skip lists per present sequence index, and their pre-norm bottlenecks."""
        if x.shape[1] != self.n_channels:
            raise ValueError(f"input has {x.shape[1]} channel(s), the network expects {self.n_channels} (absent ones zero)")
        tailored, tailored_raw = {}, {}
        for m in self.present:
            tailored[m], tailored_raw[m] = encode_keeping_raw(self.tailored[self.sequence_keys[m]], x[:, m:m + 1])
        # one batched pass of the shared encoder over all present sequences
        stacked, stacked_raw = encode_keeping_raw(self.shared, torch.cat([x[:, m:m + 1] for m in self.present], dim=0))
        b = x.shape[0]
        shared = {m: [s[i * b:(i + 1) * b] for s in stacked] for i, m in enumerate(self.present)}
        shared_raw = {m: stacked_raw[i * b:(i + 1) * b] for i, m in enumerate(self.present)}
        return tailored, shared, tailored_raw, shared_raw

    def _queries(self, shared_mean: torch.Tensor, tailored: dict[int, list[torch.Tensor]], stage: int) -> dict[int, torch.Tensor]:
        """The key spaces this site queries a missing sequence's memory with (see MEMORY_QUERIES)."""
        queries: dict[int, torch.Tensor] = {}
        if self.memory_query in ("shared", "both"):
            queries[SHARED_KEY] = shared_mean
        if self.memory_query in ("tailored", "both"):
            queries.update({tailored_key(q): tailored[q][stage] for q in self.present})
        return queries

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        tailored, shared, tailored_raw, shared_raw = self.encode(x)
        n_stages = len(self.fuse)
        bottleneck = n_stages - 1
        shared_mean = [torch.stack([shared[m][s] for m in self.present]).mean(0) for s in range(n_stages)]
        retrieved: dict[int, torch.Tensor] = {}
        fused = []
        for s in range(n_stages):
            slots = [shared_mean[s]]
            for m in range(self.n_channels):
                if m in tailored:
                    slots.append(tailored[m][s])
                elif self.use_memory:
                    pseudo = retrieve(self.memory_of(m, s), self._queries(shared_mean[s], tailored, s))
                    if s == bottleneck:
                        retrieved[m] = pseudo
                    slots.append(pseudo)
                else:
                    slots.append(torch.zeros_like(shared_mean[s]))
            fused.append(self.fuse[s](torch.cat(slots, dim=1)))
        outputs = self.decoder(fused, self.deep_supervision)
        seg = outputs if self.deep_supervision else outputs[0]
        if not return_aux:
            return seg
        aux = {
            "tailored": {m: t[bottleneck] for m, t in tailored.items()},
            "shared": {m: t[bottleneck] for m, t in shared.items()},
            "shared_mean": shared_mean[bottleneck],
            # pre-norm bottlenecks: what the decoupling losses see
            "tailored_raw": tailored_raw,
            "shared_raw": shared_raw,
            "retrieved": retrieved,
            # every stage, for the memory refresh
            "stage_shared_mean": shared_mean,
            "stage_tailored": tailored,
        }
        return seg, aux


def build_mixmfl_network(
    config: ConfigurationPlan,
    sequence_keys: Sequence[str],
    n_classes: int,
    present: Sequence[int] | None = None,
    memory_size: int = DEFAULT_MEMORY_SIZE,
    use_memory: bool = True,
    memory_query: str = "both",
    seed: int | None = None,
) -> MixMFLNet:
    """The mix-modal network of a plan's configuration; `seed` makes the initial weights deterministic."""
    def make() -> MixMFLNet:
        return MixMFLNet(config.network, config.ndim, sequence_keys, n_classes, present, memory_size, use_memory, memory_query)

    if seed is None:
        net = make()
        init_weights(net)
        return net
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))   # the Linear layers' default init draws from the global RNG
        net = make()
    init_weights(net, torch.Generator().manual_seed(int(seed)))
    return net

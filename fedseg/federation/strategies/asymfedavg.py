"""AsymFedAvg (FednnU-Net): every site trains the network nnU-Net plans from its own data;
the parameters on which those networks agree are averaged, everything else stays local.

Sites scanned with 1 mm and 4 mm slices want different target spacings, patches, kernels
(1x3x3 across thick slices) and depths. `fedseg plan --strategy asymfedavg` therefore plans
one configuration per site ("3d_fullres@<site>", from the site's own fingerprint; see
fedseg.planning.planner.site_configurations) and, once the parameter manifests exist, the
shared-parameter map (`plans.extra["shared_parameters"]`):

- positions are structural: encoder stage s is counted from the input (stage 0 sees the
  image at every site); decoder stages are counted from the output (`decoder_match=output`,
  the default: level 0 is the full-resolution stage that feeds the segmentation, at every
  site, whatever its depth; key `decoder.<part>.out<level>.<rest>`) or, for comparison, from
  the bottleneck (`decoder_match=bottleneck`: the plain U-Net's own indexing, so the key is
  the parameter name; with nnU-Net's widths, sites of different depth then share no decoder
  tensor at all). A tensor outside that layout gets no position and stays local;
- a convolution's meaning depends on its stride as well as its shape: a 3x3x3 filter applied
  with stride (2,2,2) downsamples across slices, the same-shaped filter with stride (1,2,2)
  does not. With `match_strides=true` (the default) a layer is only shared between sites that
  apply it with the same stride (transposed convolutions carry their stride in their shape);
- the unit of sharing is a layer (a convolution with its bias and its norm's scale and shift,
  a transposed convolution, a segmentation head): a norm's scale or a bias only means
  something for the filters that make its channels, so sharing it where the filters differ
  would average unrelated channels. The sites holding a position are split by the shapes and
  dtypes of all the layer's tensors; every group of two or more sites is a pool: "global" when it is every site of the plan, "sites:<a>+<b>" for a
  subset. One site alone, or a position whose shape differs from everyone else's, is local;
- `local_norms=true` keeps the InstanceNorm affine parameters local (FedBN).

Round 0 (`aligned_init`, on by default): a shared layer is only worth averaging if its input
channels mean the same at every site, and they come from layers that may be local (site_a's
3x3x3 first convolution next to site_c's 1x3x3 one). Built independently, those local layers
start with unrelated filters, so the first shared layer after them would average weights
that read unrelated channels. Instead every position's tensors are derived from one
reference (the largest, first site in name order): a kernel axis of extent 1 is the
reference summed along that axis (a 1x3x3 filter responds to a slice as the 3x3x3 one does to a
volume constant across slices), fewer channels are the first ones, and the weights are
rescaled so that the He initialisation's variance holds for the smaller fan-in.

The update a site writes holds only its pooled tensors; the rest lives in its state folder
(`local.safetensors`). A pool is averaged weighted by n_cases (Σ n_k w_k / Σ n_k over the
pool's sites); `weighting=uniform` gives the reference implementation's plain mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.federation.strategies.base import (
    GLOBAL_POOL,
    CaseWeighting,
    Manifest,
    ProposedRoutes,
    Strategy,
    case_weight,
)
from fedseg.typed_params import param

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

SUBSET_POOL_PREFIX = "sites:"
# How decoder stages are paired across sites of different depth (`--set decoder_match=...`).
DECODER_MATCHES = ("output", "bottleneck")
DEFAULT_DECODER_MATCH = "output"


def rule_text(decoder_match: str, match_strides: bool) -> str:
    """The map's rule in words (written into plans.json and shown by `fedseg inspect`)."""
    decoder = "from the output (full-resolution end)" if decoder_match == "output" else "from the bottleneck"
    agree = "shapes and strides" if match_strides else "shapes"
    return (f"encoder stages matched from the input, decoder stages {decoder}; "
            f"a layer (conv with its norm) is shared by every group of >= 2 sites whose {agree} all agree, local otherwise")




@dataclass(frozen=True)
class AsymFedAvgParams(CaseWeighting):
    """The rule's keys (`fedseg plan --set KEY=VALUE`); see the module docstring."""

    decoder_match: str = param(DEFAULT_DECODER_MATCH, choices=DECODER_MATCHES)
    local_norms: bool = param(False)       # keep InstanceNorm affine parameters local (FedBN)
    aligned_init: bool = param(True)       # round-0 tensors of one position derived from one reference
    match_strides: bool = param(True)      # a layer is shared only where its stride agrees
    match_inputs: bool = param(False)      # ... and only where its inputs are pooled alike

# encoder.stages.{s}.<rest>: s counted from the input (0 = full resolution)
_ENCODER = re.compile(r"^encoder\.stages\.(\d+)\.(.+)$")
# decoder.{transpconvs|stages|seg_layers}.{j}.<rest>: j counted from the bottleneck
_DECODER = re.compile(r"^decoder\.(transpconvs|stages|seg_layers)\.(\d+)\.(.+)$")
# InstanceNorm affine parameters of a ConvNormNonlin block
_NORM = re.compile(r"(^|\.)norm\.(weight|bias)$")


def structural_key(name: str, decoder_stages: int | None = None, decoder_match: str = "bottleneck") -> str | None:
    """The position of a parameter that is comparable across sites, or None (not shareable).

    Encoder positions count from the input: the key is the name. Decoder positions count from
    the bottleneck (the name itself) or, with decoder_match="output", from the output: decoder
    stage j of a network with `decoder_stages` decoder stages is level decoder_stages-1-j,
    key `decoder.<part>.out<level>.<rest>` (a name of its own, so that a pool key never reads
    as a site's parameter name of another stage).
    """
    match = _ENCODER.match(name)
    if match:
        return f"encoder.stages.{int(match.group(1))}.{match.group(2)}"
    match = _DECODER.match(name)
    if not match:
        return None
    part, j, rest = match.group(1), int(match.group(2)), match.group(3)
    if decoder_match == "bottleneck":
        return f"decoder.{part}.{j}.{rest}"
    if decoder_match != "output" or decoder_stages is None:
        raise ValueError(f"decoder_match={decoder_match!r} needs the network's number of decoder stages")
    return f"decoder.{part}.out{decoder_stages - 1 - j}.{rest}"


def decoder_depth(names: Iterable[str]) -> int:
    """Number of decoder stages of a plain U-Net, from its parameter names."""
    return 1 + max((int(m.group(2)) for m in map(_DECODER.match, names) if m), default=-1)


def structural_keys(names: Iterable[str], decoder_match: str) -> dict[str, str]:
    """{name: position key} for the names of one site's network that have a position."""
    names = list(names)
    depth = decoder_depth(names)
    keys = {name: structural_key(name, depth, decoder_match) for name in names}
    return {name: key for name, key in keys.items() if key is not None}


def layer_strides(spec: Any) -> dict[str, tuple[int, ...]]:
    """{layer (block of parameter names): stride} of a plain U-Net's strided convolutions: the
    first convolution of every encoder stage (every other layer has stride 1, and a transposed
    convolution's stride is its kernel shape)."""
    return {f"encoder.stages.{s}.convs.0": tuple(int(x) for x in stride) for s, stride in enumerate(spec.strides)}


def is_norm_parameter(name: str) -> bool:
    return bool(_NORM.search(name))


def shared_parameter_map(
    manifests: Mapping[str, Mapping[str, tuple[Sequence[int], str]]],
    local_norms: bool = False,
    decoder_match: str = DEFAULT_DECODER_MATCH,
    strides: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    match_inputs: bool = False,
) -> dict[str, Any]:
    """The map for sites with the given manifests ({site: {name: (shape, dtype)}}).

    `strides` ({site: {layer: stride}}, see layer_strides) makes a layer's stride part of what
    must agree; None compares shapes only. `match_inputs`: a layer is pooled only among sites
    whose layers feeding it (see input_layers) are pooled together too, so that its input
    channels come from the same shared filters at every member.
    Returns {"rule", "local_norms", "decoder_match", "sites": {site: {name: key}} (shared names
    only), "keys": {pool/key id: {"key", "pool", "shape", "dtype", "sites"}}}.
    Deterministic: sites and names are visited in sorted order.
    """
    layout = _Layout()
    for site in sorted(manifests):
        layout.add_site(site, manifests[site], (strides or {}).get(site, {}), local_norms, decoder_match)
    all_sites = sorted(manifests)
    sites_map: dict[str, dict[str, dict[str, str]]] = {site: {} for site in all_sites}
    keys: dict[str, dict[str, Any]] = {}
    pool_of: dict[tuple[str, str], str] = {}      # (site, block) -> pool, for pooled layers
    feeds = {site: input_layers(manifests[site]) for site in all_sites} if match_inputs else None
    for block in sorted(layout.positions, key=_layer_order):
        # member_sites are in sorted order: sites were visited sorted
        for signature, member_sites in layout.groups(block, feeds, pool_of):
            if len(member_sites) < 2:
                continue
            pool = GLOBAL_POOL if member_sites == all_sites else SUBSET_POOL_PREFIX + "+".join(member_sites)
            for key, shape, dtype in signature[:-1]:     # the last entry is the stride
                keys[f"{pool}/{key}"] = {"key": key, "pool": pool, "shape": list(shape), "dtype": dtype, "sites": list(member_sites)}
            for site in member_sites:
                pool_of[(site, block)] = pool
                for name, key in layout.names_of[(site, block)]:
                    sites_map[site][name] = {"pool": pool, "key": key}
    rule = rule_text(decoder_match, strides is not None) + ("; inputs pooled alike" if match_inputs else "")
    return {"rule": rule, "local_norms": bool(local_norms), "decoder_match": decoder_match, "sites": sites_map, "keys": keys}


class _Layout:
    """The sites' layers by structural position: which sites agree on a layer's tensors and stride."""

    def __init__(self) -> None:
        # block -> signature -> [site]; a signature is the block's ((key, shape, dtype), ..., ("stride", s))
        self.positions: dict[str, dict[tuple, list[str]]] = {}
        self.names_of: dict[tuple[str, str], list[tuple[str, str]]] = {}   # (site, block) -> [(name, key)]
        self.key_block_of: dict[tuple[str, str], str] = {}                  # (site, layer by name) -> block
        self.layer_of: dict[tuple[str, str], str] = {}                      # (site, block) -> layer by name

    def add_site(self, site: str, manifest: Mapping[str, tuple[Sequence[int], str]], site_strides: Mapping[str, Sequence[int]],
                 local_norms: bool, decoder_match: str) -> None:
        blocks: dict[str, list[tuple[str, tuple[int, ...], str, str]]] = {}
        block_stride: dict[str, tuple[int, ...]] = {}
        for name, key in sorted(structural_keys(manifest, decoder_match).items()):
            shape, dtype = manifest[name]
            if not np.issubdtype(np.dtype(dtype), np.floating):
                continue  # integer buffers are never averaged
            if local_norms and is_norm_parameter(name):
                continue
            blocks.setdefault(block_of(key), []).append((key, tuple(int(x) for x in shape), str(dtype), name))
            block_stride[block_of(key)] = tuple(site_strides.get(block_of(name), ()))
            self.key_block_of[(site, block_of(name))] = block_of(key)
            self.layer_of[(site, block_of(key))] = block_of(name)
        for block, tensors in blocks.items():
            signature = tuple((key, shape, dtype) for key, shape, dtype, _ in tensors) + (("stride", block_stride[block]),)
            self.positions.setdefault(block, {}).setdefault(signature, []).append(site)
            self.names_of[(site, block)] = [(name, key) for key, _, _, name in tensors]

    def groups(self, block: str, feeds: Mapping[str, Mapping[str, tuple[str, ...]]] | None,
               pool_of: Mapping[tuple[str, str], str]) -> list[tuple[tuple, list[str]]]:
        """(signature, sites) of every group of sites that agree on `block`; with `feeds`
        (match_inputs), split further by where their inputs come from (a local input: the site itself)."""
        groups: list[tuple[tuple, list[str]]] = []
        for signature, member_sites in sorted(self.positions[block].items()):
            if feeds is None:
                groups.append((signature, member_sites))
                continue
            by_inputs: dict[tuple, list[str]] = {}
            for site in member_sites:
                layer = self.layer_of[(site, block)]
                sources = tuple(pool_of.get((site, self.key_block_of.get((site, src), "")), "local:" + site)
                                for src in feeds[site].get(layer, ()))
                by_inputs.setdefault(sources, []).append(site)
            groups += [(signature, sites) for _, sites in sorted(by_inputs.items())]
        return groups


def input_layers(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{layer: the layers whose output it reads} of a plain U-Net, by parameter-name blocks
    (`encoder.stages.1.convs.0`, `decoder.transpconvs.0`, ...); the first layer reads the image
    (no entry)."""
    layers = {block_of(name) for name in names if structural_key(name) is not None}
    convs: dict[str, int] = {}          # stage prefix -> number of convs
    for layer in layers:
        stage, _, index = layer.rpartition(".convs.")
        if index.isdigit():
            convs[stage] = max(convs.get(stage, 0), int(index) + 1)

    def last(stage: str) -> str:
        return f"{stage}.convs.{convs[stage] - 1}"

    n_enc = sum(1 for stage in convs if stage.startswith("encoder."))
    feeds: dict[str, tuple[str, ...]] = {}
    for layer in layers:
        parts = layer.split(".")
        if layer.startswith("encoder."):
            s, i = int(parts[2]), int(parts[4])
            if i > 0:
                feeds[layer] = (f"encoder.stages.{s}.convs.{i - 1}",)
            elif s > 0:
                feeds[layer] = (last(f"encoder.stages.{s - 1}"),)
        elif parts[1] == "transpconvs":
            j = int(parts[2])
            feeds[layer] = (last(f"decoder.stages.{j - 1}") if j > 0 else last(f"encoder.stages.{n_enc - 1}"),)
        elif parts[1] == "stages":
            j, i = int(parts[2]), int(parts[4])
            feeds[layer] = ((f"decoder.stages.{j}.convs.{i - 1}",) if i > 0
                            else (f"decoder.transpconvs.{j}", last(f"encoder.stages.{n_enc - 2 - j}")))
        else:   # seg_layers
            feeds[layer] = (last(f"decoder.stages.{int(parts[2])}"),)
    return feeds


def _layer_order(block: str) -> tuple:
    """Blocks (position keys of layers) in an order where every layer comes after those it
    reads: the encoder from the input, then the decoder from the bottleneck up (from the
    deepest level when levels count from the output)."""
    parts = block.split(".")
    if parts[0] == "encoder":
        return (0, int(parts[2]), int(parts[4]) if len(parts) > 4 else 0, 0)
    level = parts[2]
    depth = -int(level[3:]) if level.startswith("out") else int(level)
    kind = {"transpconvs": 0, "stages": 1, "seg_layers": 2}[parts[1]]
    return (1, depth, kind, int(parts[4]) if len(parts) > 4 else 0)


def derive_from_reference(reference: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """A tensor of `shape` whose channels and filters follow `reference`, or None if it cannot.

    Convolution weights (out, in, *kernel) and transposed ones (in, out, *kernel): a kernel axis
    of extent 1 where the reference is wider is the sum along that axis; the leading channels
    are kept where there are fewer; the result is scaled by sqrt(reference.shape[1] / shape[1]) so
    that He initialisation's variance (fan-in = shape[1] x kernel volume) holds. Vectors (bias,
    norm scale and shift): the leading entries.
    """
    shape = tuple(int(n) for n in shape)
    if reference.ndim != len(shape) or any(n > r for n, r in zip(shape, reference.shape)):
        return None
    if reference.ndim == 1:
        return reference[: shape[0]].copy()
    if reference.ndim < 3:
        return None
    out = reference
    for axis in range(2, reference.ndim):
        if shape[axis] == out.shape[axis]:
            continue
        if shape[axis] != 1:
            return None
        out = out.sum(axis=axis, keepdims=True)
    out = out[: shape[0], : shape[1]]
    return (out * np.sqrt(reference.shape[1] / shape[1])).astype(reference.dtype)


def aligned_initial_states(
    states: Mapping[str, Mapping[str, np.ndarray]], decoder_match: str = DEFAULT_DECODER_MATCH
) -> dict[str, dict[str, np.ndarray]]:
    """Round-0 weights whose differently shaped tensors at one structural position all follow
    one reference (the largest; the first site in name order among equals); see the module
    docstring. Tensors that cannot be derived, and positions where every site agrees, are kept."""
    holders: dict[str, list[tuple[str, str]]] = {}
    for site in sorted(states):
        for name, key in sorted(structural_keys(states[site], decoder_match).items()):
            if np.issubdtype(states[site][name].dtype, np.floating):
                holders.setdefault(key, []).append((site, name))
    aligned = {site: dict(tensors) for site, tensors in states.items()}
    for key, members in holders.items():
        if len({states[site][name].shape for site, name in members}) < 2:
            continue
        ref_site, ref_name = max(members, key=lambda m: states[m[0]][m[1]].size)   # first of the largest
        reference = states[ref_site][ref_name]
        for site, name in members:
            own = states[site][name]
            if own.shape == reference.shape:
                aligned[site][name] = reference
                continue
            derived = derive_from_reference(reference, own.shape)
            if derived is not None:
                aligned[site][name] = derived.astype(own.dtype)
    return aligned


def block_of(key: str) -> str:
    """The layer a parameter belongs to: `...convs.0.conv.weight` and `...convs.0.norm.bias`
    -> `...convs.0` (a convolution with its norm), `decoder.transpconvs.1.weight` ->
    `decoder.transpconvs.1`. Layers are shared whole: a norm's scale and a conv's bias only
    mean something together with the filters that produce their channels."""
    parts = key.split(".")[:-1]
    if parts and parts[-1] in ("conv", "norm"):
        parts = parts[:-1]
    return ".".join(parts)


class AsymFedAvg(Strategy):
    name = "asymfedavg"
    description = "per-site plans (FednnU-Net); structurally matching, same-shape parameters averaged, the rest local"
    Params = AsymFedAvgParams
    # make_plans plans one configuration per site from its own fingerprint
    plans_per_site = True

    def initial_states(self, plans: Plans, states: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        params = self.rule_params(plans)
        return aligned_initial_states(states, params.decoder_match) if params.aligned_init else states

    # -- plan time ---------------------------------------------------------------------------
    def shared_map(self, plans: Plans, manifests: Mapping[str, Manifest]) -> dict[str, Any]:
        """The shared-parameter map of `shared_parameter_map` for these sites and parameters."""
        params = self.rule_params(plans)
        strides = None
        if params.match_strides:
            strides = {site: layer_strides(plans.configuration_for(site).network) for site in manifests}
        return shared_parameter_map(manifests, local_norms=params.local_norms, decoder_match=params.decoder_match,
                                    strides=strides, match_inputs=params.match_inputs)

    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        shared = self.shared_map(plans, manifests)
        tensors = {site: {name: (entry["pool"], entry["key"]) for name, entry in shared["sites"][site].items()}
                   for site in manifests}
        return ProposedRoutes(tensors, model_pools=frozenset({GLOBAL_POOL}))

    # -- merging -----------------------------------------------------------------------------
    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float:
        return case_weight(self.rule_params(plans), n_cases)

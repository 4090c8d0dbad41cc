"""A SAM-style 2D segmentation model (Segment Anything), prompt-free, with optional MSA adapters.

Written here (no dependency on the `segment-anything` package, which pulls in torchvision)
with SAM's parameter names, so a real SAM checkpoint (`sam_vit_b_01ec64.pth`, ...) loads by
name:

    image_encoder.patch_embed.proj.*        16x16 patch embedding (conv)
    image_encoder.pos_embed                 absolute position embedding (1, H/16, W/16, D)
    image_encoder.blocks.{i}.norm1/attn/norm2/mlp.*   ViT blocks; attn.rel_pos_h/_w are SAM's
                                            decomposed relative positions; windowed attention
                                            except at the global-attention indexes
    image_encoder.neck.{0,1,2,3}.*          1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d
    prompt_encoder.pe_layer.positional_encoding_gaussian_matrix   image positional encoding
    prompt_encoder.no_mask_embed.weight     the dense embedding SAM adds when no mask is prompted
    mask_decoder.transformer.*              two-way transformer (tokens <-> image)
    mask_decoder.iou_token / mask_tokens    output tokens
    mask_decoder.output_upscaling.*         4x upscaling of the image embedding
    mask_decoder.output_hypernetworks_mlps.{k}.*  one hypernetwork MLP per mask token

Prompt-free: the decoder runs SAM's mask prediction with no sparse prompt (only the output
tokens) and the no-mask dense embedding, and a new 1x1 convolution
`mask_decoder.class_head` turns the mask-token maps into one logit map per class. SAM's
point/box/mask prompt embeddings and its IoU prediction head are not part of the model
(reported as unexpected when a checkpoint is loaded).

MSA adapters (Medical SAM Adapter, FedMSA): in every encoder block, a bottleneck
Linear(D -> D/4)-GELU-Linear(D/4 -> D) after attention with a skip connection
(`Space_Adapter`), and one parallel to the MLP, scaled by 0.5 (`MLP_Adapter`); MSA's names,
so MSA checkpoints load their adapters too. With `freeze_backbone`, the image encoder
(except adapters) and the positional encoding are frozen and left out of `state_dict()`:
they are rebuilt from the SAM checkpoint (or the seed) wherever the model is built, so they
are never exchanged nor saved per round.

Input: (B, C, H, W) with C = the plan's channels (already normalised per plan). One channel
is repeated to the encoder's 3 (SAM sees RGB), three are used as they are, any other count
goes through a learned 1x1 projection `input_proj`. The image is resized to the model's
`image_size`, and the logits are resized back to (H, W). A (B, C, Z, H, W) input (a 3D
configuration) is segmented slice by slice.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedseg.errors import InputError

# SAM's LayerNorm epsilon (image encoder blocks, neck and upscaling).
LN_EPS = 1e-6
# MSA's adapter bottleneck: D -> D/4 -> D (mlp_ratio 0.25).
ADAPTER_RATIO = 0.25
# MSA scales the MLP-parallel adapter by 0.5 so it starts as a small correction of the MLP.
MLP_ADAPTER_SCALE = 0.5
# SAM predicts 3 multimask outputs + 1 single-mask output: 4 mask tokens.
NUM_MASK_TOKENS = 4
# ViT's initialisation of a learned absolute position embedding (SAM's checkpoint replaces it).
POS_EMBED_INIT_STD = 0.02


@dataclass(frozen=True)
class SamConfig:
    """Shapes of a SAM model (SAM's `build_sam_vit_*` arguments)."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256         # = neck output = decoder width
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


SAM_CONFIGS: dict[str, SamConfig] = {
    # SAM's published shapes (segment_anything/build_sam.py): real checkpoints load into these.
    "vit_b": SamConfig("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # The same architecture scaled down to train on a CPU in seconds: 64 px input, 8 px
    # patches (8x8 tokens), 4 blocks alternating windowed (4x4) and global attention, a
    # 32-wide decoder. ~0.3 M parameters.
    "tiny": SamConfig(
        "tiny", 64, 4, 4, (1, 3), image_size=64, patch_size=8, window_size=4,
        prompt_embed_dim=32, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=128,
    ),
}


def sam_config(name: str, image_size: int | None = None) -> SamConfig:
    if name not in SAM_CONFIGS:
        raise InputError(f"unknown SAM configuration {name!r} (known: {', '.join(sorted(SAM_CONFIGS))})")
    config = SAM_CONFIGS[name]
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < config.patch_size:
            raise InputError(f"sam.image_size must be an integer >= {config.patch_size}, got {image_size!r}")
        if image_size % config.patch_size:
            raise InputError(f"sam.image_size {image_size} must be a multiple of the patch size {config.patch_size}")
        config = replace(config, image_size=image_size)
    return config


# ---------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------
class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map (SAM's LayerNorm2d)."""

    def __init__(self, num_channels: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Adapter(nn.Module):
    """MSA's bottleneck adapter: x -> D_fc2(GELU(D_fc1(x))) (+ x with `skip_connect`).

    D_fc2 starts at zero, so a freshly adapted encoder computes exactly the pretrained
    features (training starts from SAM, not from SAM plus noise).
    """

    def __init__(self, dim: int, ratio: float = ADAPTER_RATIO, skip_connect: bool = True) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.skip_connect = skip_connect
        self.D_fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.D_fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.D_fc2(self.act(self.D_fc1(x)))
        return x + xs if self.skip_connect else xs


# ---------------------------------------------------------------------------------------
# image encoder (SAM's ImageEncoderViT)
# ---------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * n_windows, ws, ws, C), zero-padding H and W up to multiples of ws."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative positional embeddings for every (query, key) offset, interpolated if needed (SAM)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear")
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative.long()]


def add_decomposed_rel_pos(
    attn: torch.Tensor, q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
    q_size: tuple[int, int], k_size: tuple[int, int],
) -> torch.Tensor:
    """SAM's (MViTv2's) decomposed relative position bias: one term per axis."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    attn = attn.view(b, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(b, q_h * q_w, k_h * k_w)


class EncoderAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token map with relative positions."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # SAM zero-initialises relative positions (rel_pos_zero_init=True)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


class EncoderBlock(nn.Module):
    """SAM's ViT block, optionally with MSA's two adapters."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int,
                 input_size: tuple[int, int], adapters: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EncoderAttention(dim, num_heads, input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        if adapters:
            self.Space_Adapter = Adapter(dim, skip_connect=True)
            self.MLP_Adapter = Adapter(dim, skip_connect=False)

    @property
    def has_adapters(self) -> bool:
        return hasattr(self, "Space_Adapter")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.has_adapters:
            x = self.Space_Adapter(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        xn = self.norm2(x)
        out = x + self.mlp(xn)
        if self.has_adapters:
            out = out + MLP_ADAPTER_SCALE * self.MLP_Adapter(xn)
        return out


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)   # B C H W -> B H W C


class ImageEncoderViT(nn.Module):
    def __init__(self, config: SamConfig, adapters: bool) -> None:
        super().__init__()
        d, size = config.encoder_embed_dim, config.embedding_size
        self.patch_embed = PatchEmbed(config.patch_size, 3, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, size, size, d))
        self.blocks = nn.ModuleList(
            EncoderBlock(d, config.encoder_num_heads, config.mlp_ratio,
                         0 if i in config.global_attn_indexes else config.window_size, (size, size), adapters)
            for i in range(config.encoder_depth)
        )
        out = config.prompt_embed_dim
        self.neck = nn.Sequential(
            nn.Conv2d(d, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------
# prompt encoder: only what a prompt-free decoder uses
# ---------------------------------------------------------------------------------------
class PositionEmbeddingRandom(nn.Module):
    """SAM's random Fourier-feature positional encoding of normalised (x, y) coordinates."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def forward(self, h: int, w: int) -> torch.Tensor:
        matrix = self.positional_encoding_gaussian_matrix
        grid = torch.ones((h, w), device=matrix.device, dtype=matrix.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        coords = 2 * torch.stack([x, y], dim=-1) - 1
        coords = 2 * math.pi * (coords @ matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1)   # C x H x W


class PromptFreeEncoder(nn.Module):
    """The two pieces of SAM's prompt encoder a prompt-free decoder needs (same names)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self, h: int, w: int) -> torch.Tensor:
        return self.pe_layer(h, w).unsqueeze(0)

    def dense_embeddings(self, batch: int, h: int, w: int) -> torch.Tensor:
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)


# ---------------------------------------------------------------------------------------
# mask decoder (SAM's MaskDecoder + TwoWayTransformer, prompt-free, multi-class head)
# ---------------------------------------------------------------------------------------
class DecoderAttention(nn.Module):
    """SAM's attention with optional downscaling of the embedding after projection."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = attn.softmax(dim=-1) @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DecoderAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DecoderAttention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor):
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, image_pe)
        q, k = queries + point_embedding, keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class HyperMLP(nn.Module):
    """SAM's MLP (ReLU between `layers`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class PromptFreeMaskDecoder(nn.Module):
    def __init__(self, config: SamConfig, n_classes: int) -> None:
        super().__init__()
        dim = config.prompt_embed_dim
        self.transformer = TwoWayTransformer(
            config.decoder_depth, dim, config.decoder_heads, config.decoder_mlp_dim, config.attention_downsample_rate
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(HyperMLP(dim, dim, dim // 8, 3) for _ in range(NUM_MASK_TOKENS))
        # new: mask-token maps -> class logits (the multi-class, prompt-free head)
        self.class_head = nn.Conv2d(NUM_MASK_TOKENS, n_classes, kernel_size=1)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        b = image_embeddings.shape[0]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
        src = image_embeddings + dense
        pos = image_pe.expand(b, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1:1 + NUM_MASK_TOKENS, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        bu, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.view(bu, cu, hu * wu)).view(bu, -1, hu, wu)
        return self.class_head(masks)


# ---------------------------------------------------------------------------------------
# the segmenter
# ---------------------------------------------------------------------------------------
def is_adapter(name: str) -> bool:
    return ".Space_Adapter." in name or ".MLP_Adapter." in name


def is_frozen_backbone(name: str) -> bool:
    """FedMSA's frozen part: the image encoder except its adapters, and the positional encoding."""
    return (name.startswith("image_encoder.") and not is_adapter(name)) or name.startswith("prompt_encoder.pe_layer.")


class SamSegmenter(nn.Module):
    """Prompt-free SAM for semantic segmentation; see the module docstring."""

    def __init__(self, config: SamConfig, n_channels: int, n_classes: int,
                 adapters: bool = False, freeze_backbone: bool = False) -> None:
        super().__init__()
        if n_channels < 1 or n_classes < 2:
            raise ValueError("need at least one channel and two classes")
        self.config = config
        self.n_channels = n_channels
        self.n_classes = n_classes
        if n_channels not in (1, 3):
            self.input_proj = nn.Conv2d(n_channels, 3, kernel_size=1)
        self.image_encoder = ImageEncoderViT(config, adapters)
        self.prompt_encoder = PromptFreeEncoder(config.prompt_embed_dim)
        self.mask_decoder = PromptFreeMaskDecoder(config, n_classes)
        self.freeze_backbone = freeze_backbone
        self.checkpoint_report: str | None = None
        if freeze_backbone:
            for name, p in self.named_parameters():
                if is_frozen_backbone(name):
                    p.requires_grad_(False)

    # -- persistence: the frozen backbone is not part of the state ------------------------
    def frozen_names(self) -> set[str]:
        if not self.freeze_backbone:
            return set()
        return {n for n, _ in self.all_tensors().items() if is_frozen_backbone(n)}

    def all_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, frozen backbone included (what a SAM checkpoint fills)."""
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.freeze_backbone:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for key in [k for k in state if is_frozen_backbone(k[len(prefix):])]:
                del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            missing = [k for k in result.missing_keys if not (self.freeze_backbone and is_frozen_backbone(k))]
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"state does not fit the SAM model: missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
                )
        return result

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:   # (B, C, Z, H, W): a 3D patch, segmented slice by slice
            b, c, z, h, w = x.shape
            flat = x.permute(0, 2, 1, 3, 4).reshape(b * z, c, h, w)
            out = self.forward(flat)
            return out.reshape(b, z, -1, h, w).permute(0, 2, 1, 3, 4)
        if x.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) or (B, C, Z, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.n_channels == 1:
            x = x.expand(-1, 3, -1, -1)   # SAM's encoder was trained on RGB
        elif self.n_channels != 3:
            x = self.input_proj(x)
        size = self.config.image_size
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        embeddings = self.image_encoder(x)
        eh, ew = embeddings.shape[-2:]
        logits = self.mask_decoder(
            embeddings, self.prompt_encoder.dense_pe(eh, ew), self.prompt_encoder.dense_embeddings(x.shape[0], eh, ew)
        )
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits


def init_sam_weights(model: SamSegmenter, generator: torch.Generator, zero_adapters: bool = True) -> None:
    """Seeded initial weights (used where no checkpoint provides them).

    Linear and conv layers keep PyTorch's default scheme (as SAM's builder does), redrawn
    from `generator`; the absolute position embedding gets ViT's N(0, 0.02) instead of SAM's
    zeros, so a model trained without a checkpoint still sees where each patch is; the
    adapters' output layers stay zero unless `zero_adapters` is False (MSA's code: default
    init for them too); the Fourier matrix is standard normal as in SAM.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                if name.endswith("D_fc2") and zero_adapters:
                    continue
                fan_in = nn.init._calculate_fan_in_and_fan_out(module.weight)[1 if isinstance(module, nn.ConvTranspose2d) else 0]
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=generator)
        model.image_encoder.pos_embed.normal_(0.0, POS_EMBED_INIT_STD, generator=generator)
        model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.normal_(0.0, 1.0, generator=generator)


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    path: str
    loaded: list[str]
    missing: list[str]          # model tensors the checkpoint did not provide (new: adapters, class head)
    unexpected: list[str]       # checkpoint tensors the model has no use for (prompt embeddings, IoU head)
    resized: list[str]          # position embeddings interpolated to another image size

    def summary(self) -> str:
        """One line: counts, then the missing/unexpected names with block indexes folded to *."""
        parts = [f"SAM checkpoint {Path(self.path).name}: loaded {len(self.loaded)} tensors"]
        if self.resized:
            parts.append(f"resized {len(self.resized)} ({_fold(self.resized)})")
        parts.append(f"missing {len(self.missing)} ({_fold(self.missing) or '-'})")
        parts.append(f"unexpected {len(self.unexpected)} ({_fold(self.unexpected) or '-'})")
        return "; ".join(parts)


def _fold(names: list[str]) -> str:
    """Compress names: indexes become *, duplicates go ('blocks.*.MLP_Adapter.D_fc1.weight')."""
    folded = sorted({re.sub(r"\.\d+\.", ".*.", re.sub(r"\.\d+\.", ".*.", n)) for n in names})
    return ", ".join(folded)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A SAM checkpoint as {name: tensor}: a torch file (read with the safe, tensors-only
    loader, never arbitrary pickle) or .safetensors; a {"model": {...}} wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise InputError("SAM checkpoint not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for foreign or damaged files
        raise InputError(f"cannot read SAM checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", path) from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise InputError("is not a SAM checkpoint (expected a dict of named tensors)", path)
    return obj


def _resize_pos_embed(value: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """(1, H, W, D) position embedding -> (1, H', W', D), bicubic (as SAMed/MSA do for other input sizes)."""
    x = value.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(target[1], target[2]), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1)


def _resize_rel_pos(value: torch.Tensor, target: torch.Size) -> torch.Tensor:
    x = value.float().t().unsqueeze(0)   # (1, head_dim, L)
    return F.interpolate(x, size=target[0], mode="linear", align_corners=False)[0].t()


def load_sam_weights(model: SamSegmenter, tensors: Mapping[str, torch.Tensor], path: str | Path = "") -> LoadReport:
    """Copy a SAM state into `model` by name (non-strict) and say what did not match.

    Position embeddings (absolute and relative) are interpolated when the model's image size
    differs from the checkpoint's; any other shape mismatch means another SAM variant and is
    an InputError naming the tensor.
    """
    own = model.all_tensors()
    loaded, unexpected, resized = [], [], []
    with torch.no_grad():
        for name, value in tensors.items():
            target = own.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if value.shape != target.shape:
                if name == "image_encoder.pos_embed" and value.ndim == 4:
                    value = _resize_pos_embed(value, target.shape)
                elif name.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and value.ndim == 2 and value.shape[1] == target.shape[1]:
                    value = _resize_rel_pos(value, target.shape)
                else:
                    raise InputError(
                        f"tensor {name!r} has shape {list(value.shape)}, the {model.config.name} model expects "
                        f"{list(target.shape)} (a checkpoint of another SAM variant? set sam.config)", path or None
                    )
                resized.append(name)
            target.copy_(value.to(target.dtype))
            loaded.append(name)
    missing = sorted(set(own) - set(loaded))
    report = LoadReport(str(path), loaded, missing, sorted(unexpected), resized)
    model.checkpoint_report = report.summary()
    return report


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_sam_segmenter(
    config: SamConfig,
    n_channels: int,
    n_classes: int,
    adapters: bool = False,
    freeze_backbone: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_sha256: str | None = None,
    seed: int = 0,
    zero_adapters: bool = True,
) -> SamSegmenter:
    """The model with seeded initial weights, then the checkpoint's where it has them.

    Deterministic: the same arguments build bit-identical weights anywhere (the global RNG
    is left as it was). On torch's meta device (shape-only builds) the checkpoint is not read.
    """
    with torch.random.fork_rng(devices=[]):
        model = SamSegmenter(config, n_channels, n_classes, adapters=adapters, freeze_backbone=freeze_backbone)
    if next(model.parameters()).is_meta:
        return model
    init_sam_weights(model, torch.Generator().manual_seed(int(seed)), zero_adapters)
    if checkpoint:
        if checkpoint_sha256:
            actual = file_sha256(checkpoint) if Path(checkpoint).is_file() else None
            if actual is not None and actual != str(checkpoint_sha256).lower():
                raise InputError(
                    f"SAM checkpoint has sha256 {actual[:16]}…, the plan expects {str(checkpoint_sha256)[:16]}…", checkpoint
                )
        load_sam_weights(model, read_checkpoint(checkpoint), checkpoint)
    return model

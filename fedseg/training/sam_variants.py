"""Shapes of SAM's variants (vit_b, vit_l, vit_h and a CPU-sized "tiny"): which one a plan builds.

Torch-free, so a plan's SAM parameters can be checked without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedseg.errors import InputError


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

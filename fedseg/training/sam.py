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

from pathlib import Path

import torch

from fedseg.errors import InputError
from fedseg.training.sam_checkpoint import LoadReport, file_sha256, load_sam_weights, read_checkpoint
from fedseg.training.sam_decoder import PromptFreeEncoder, PromptFreeMaskDecoder
from fedseg.training.sam_encoder import Adapter, ImageEncoderViT, LayerNorm2d
from fedseg.training.sam_segmenter import SamSegmenter, init_sam_weights, is_adapter, is_frozen_backbone
from fedseg.training.sam_variants import SAM_CONFIGS, SamConfig, sam_config

# The model's pieces live in sam_variants (shapes), sam_encoder, sam_decoder, sam_segmenter
# and sam_checkpoint; importable from here as one API.
__all__ = [
    "SAM_CONFIGS", "Adapter", "ImageEncoderViT", "LayerNorm2d", "LoadReport", "PromptFreeEncoder",
    "PromptFreeMaskDecoder", "SamConfig", "SamSegmenter", "build_sam_segmenter", "file_sha256", "init_sam_weights",
    "is_adapter", "is_frozen_backbone", "load_sam_weights", "read_checkpoint", "sam_config",
]


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

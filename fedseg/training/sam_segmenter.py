"""The prompt-free SAM segmenter (fedseg.training.sam describes it): input adaptation, encoder,
decoder, the frozen backbone left out of its state, and its seeded initial weights."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from fedseg.training.recipes.params import is_adapter, is_frozen_backbone
from fedseg.training.sam_decoder import PromptFreeEncoder, PromptFreeMaskDecoder
from fedseg.training.sam_encoder import ImageEncoderViT
from fedseg.training.sam_variants import SamConfig

# ViT's initialisation of a learned absolute position embedding (SAM's checkpoint replaces it).
POS_EMBED_INIT_STD = 0.02


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

"""Reading SAM and MSA checkpoints into the segmenter: by name, position embeddings
interpolated to the model's image size, and a report of what did not match."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from fedseg.errors import InputError
from fedseg.training.sam_segmenter import SamSegmenter


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

"""Which torch device to train and predict on, and what changes on a GPU.

`--device auto` (the default) takes the first CUDA GPU when torch has one and the CPU
otherwise; `cpu`, `cuda` and `cuda:N` ask for one explicitly. Asking for a GPU that this
torch build or machine does not have is a user's fault (exit 2, one line), not a crash.

On CUDA, fedseg trains as nnU-Net does: mixed precision (torch.autocast with a GradScaler)
and cuDNN's autotuner (`torch.backends.cudnn.benchmark`, worthwhile because the patch size
is fixed, so the tuned kernels are reused every iteration). On the CPU both stay off: CPU
autocast runs bfloat16, which changes results and is slower for 3D convolutions on most CPUs.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from fedseg.errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda(:\d{1,3})?)")


def check_device_name(name: str) -> str:
    """The name when it is one fedseg knows (auto, cpu, cuda, cuda:N); InputError otherwise. No torch import."""
    if not isinstance(name, str) or not _DEVICE_PATTERN.fullmatch(name):
        raise InputError(f"--device must be {DEVICE_CHOICES}, not {name!r}")
    return name


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda[:N]" checked against this torch and machine."""
    import torch  # lazily: check_device_name and this module serve commands that never load torch

    name = check_device_name(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        build = "was built without CUDA" if torch.version.cuda is None else f"(CUDA {torch.version.cuda}) finds no GPU"
        raise InputError(
            f"--device {name}: torch {torch.__version__} {build}; use --device cpu (or auto), "
            "or install a CUDA build of torch (docs/quickstart.md)"
        )
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return name


def uses_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def autocast(device: Any) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (float16 matmuls and convolutions, float32 reductions); nothing elsewhere."""
    if not uses_cuda(device):
        return contextlib.nullcontext()
    import torch  # lazily: only a CUDA device needs it here

    return torch.autocast("cuda", dtype=torch.float16)


def grad_scaler(device: Any) -> Any:
    """A GradScaler on CUDA (keeps float16 gradients from underflowing), None elsewhere."""
    if not uses_cuda(device):
        return None
    import torch  # lazily: only a CUDA device needs it here

    if hasattr(torch.amp, "GradScaler"):   # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def configure_backend(device: Any) -> None:
    """cuDNN's autotuner on CUDA (fixed patch size: the fastest kernels are found once per shape)."""
    if uses_cuda(device):
        import torch  # lazily: only a CUDA device needs it here

        torch.backends.cudnn.benchmark = True

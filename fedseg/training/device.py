"""Which torch device to train and predict on, and what changes on a GPU.

`--device auto` (the default) takes the first CUDA GPU when torch has one and the CPU
otherwise; `cpu`, `cuda` and `cuda:N` ask for one explicitly. Asking for a GPU that this
torch build or machine does not have is a user's fault (exit 2, one line), not a crash.

On CUDA, fedseg trains as nnU-Net does: mixed precision (torch.autocast with a GradScaler)
and cuDNN's autotuner (`torch.backends.cudnn.benchmark`, worthwhile because the patch size
is fixed, so the tuned kernels are reused every iteration).

`--precision` chooses the arithmetic of the network's forward pass (and so of its backward):

- `auto` (the default): float16 mixed precision on CUDA, as nnU-Net; plain float32 on the CPU.
- `fp32`: float32 everywhere (on CUDA too).
- `bf16`: bfloat16 mixed precision (torch.autocast) on the CPU or CUDA. On CPUs with AMX
  (Intel Xeon 4th generation and later) oneDNN's bfloat16 convolutions are several times
  faster than float32; on CPUs without it they can be slower. Results differ from float32 in
  the last bits of the logits, so labels near a boundary can flip; losses are computed in
  float32 from the bfloat16 outputs, and bfloat16 needs no gradient scaling.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from fedseg.errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16")
_DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda(:\d{1,3})?)")


def check_device_name(name: str) -> str:
    """The name when it is one fedseg knows (auto, cpu, cuda, cuda:N); InputError otherwise. No torch import."""
    if not isinstance(name, str) or not _DEVICE_PATTERN.fullmatch(name):
        raise InputError(f"--device must be {DEVICE_CHOICES}, not {name!r}")
    return name


def check_precision(name: str) -> str:
    """The name when it is a precision fedseg knows (auto, fp32, bf16); InputError otherwise. No torch import."""
    if name not in PRECISIONS:
        raise InputError(f"--precision must be {', '.join(PRECISIONS)}, not {name!r}")
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


def autocast_dtype(device: Any, precision: str = "auto") -> Any:
    """The torch dtype autocast runs in on `device` at `precision`, or None for plain float32."""
    import torch  # lazily: check_precision and check_device_name serve commands that never load torch

    check_precision(precision)
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and uses_cuda(device):
        return torch.float16
    return None


def autocast(device: Any, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision as `precision` asks (see the module's docstring); nothing for float32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    import torch  # lazily: only mixed precision needs it here

    return torch.autocast("cuda" if uses_cuda(device) else "cpu", dtype=dtype)


def float32_outputs(outputs: Any) -> Any:
    """A network's outputs (a tensor, or a list/tuple/dict of them) as float32: the losses of a
    bfloat16 step then run in float32, as they would in a float32 step."""
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float32_outputs(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: float32_outputs(v) for k, v in outputs.items()}
    return outputs.float() if hasattr(outputs, "float") and outputs.is_floating_point() else outputs


def grad_scaler(device: Any, precision: str = "auto") -> Any:
    """A GradScaler for float16 on CUDA (keeps its gradients from underflowing), None elsewhere:
    float32 needs none and bfloat16 has float32's exponent range."""
    import torch  # lazily: only CUDA float16 needs a scaler, but the dtype check needs torch

    if not uses_cuda(device) or autocast_dtype(device, precision) is not torch.float16:
        return None
    if hasattr(torch.amp, "GradScaler"):   # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def configure_backend(device: Any) -> None:
    """cuDNN's autotuner on CUDA (fixed patch size: the fastest kernels are found once per shape)."""
    if uses_cuda(device):
        import torch  # lazily: only a CUDA device needs it here

        torch.backends.cudnn.benchmark = True

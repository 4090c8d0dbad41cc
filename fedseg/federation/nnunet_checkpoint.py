"""nnU-Net v2's checkpoint file (`fold_X/checkpoint_final.pth`): read it safely, write it.

nnU-Net saves a pickled dict (torch.save). Its predictor reads `network_weights`,
`trainer_name`, `init_args['configuration']` and `inference_allowed_mirroring_axes`; its
trainer also stores optimizer state, logs and the epoch. A pickle can run code when it is
loaded, so fedseg reads one only with `torch.load(weights_only=True)`, which rebuilds
tensors and plain values (dict, list, tuple, str, numbers, None, torch.device) and refuses
anything else. nnU-Net's own logs hold numpy scalars, so numpy's scalar and dtype
constructors are allowed as well: they rebuild numbers from bytes and call nothing else.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.atomic import atomic_path
from fedseg.errors import InputError
from fedseg.federation.nnunet_names import from_nnunet_state, to_nnunet_state

CHECKPOINT_NAME = "checkpoint_final.pth"
# The keys nnU-Net's predictor (nnUNetPredictor.initialize_from_trained_model_folder) reads.
PREDICTOR_KEYS = ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes")


@dataclass
class NnunetCheckpoint:
    weights: dict[str, np.ndarray]          # fedseg parameter names
    trainer_name: str
    configuration: str | None
    mirror_axes: tuple[int, ...] | None


def _numpy_safe_globals() -> list[Any]:
    """numpy's constructors for scalars and dtypes, under the names numpy 1 and 2 pickle them."""
    found: list[Any] = [np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
        except ImportError:
            continue
        found.append(module.scalar)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType")
    return found


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with the numpy allowance; anything else is an InputError."""
    import torch  # lazily: start-up time of the commands that never touch a checkpoint

    path = Path(path)
    if not path.is_file():
        raise InputError("nnU-Net checkpoint not found", path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()
        reason = next((line.strip() for line in detail if "Unsupported global" in line or "GLOBAL" in line), "")
        raise InputError(
            "holds something other than tensors and plain values; refused (a pickled object could run code"
            + (f"; {reason}" if reason else "") + ")", path
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"is not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})", path) from None
    if not isinstance(obj, dict):
        raise InputError(f"is a {type(obj).__name__}, not an nnU-Net checkpoint (a dict)", path)
    return obj


def read_checkpoint(path: str | Path) -> NnunetCheckpoint:
    """An nnU-Net checkpoint's network weights (fedseg names, float arrays) and inference settings."""
    import torch  # lazily: start-up time of the commands that never touch a checkpoint

    path = Path(path)
    obj = load_checkpoint_dict(path)
    weights = obj.get("network_weights")
    if not isinstance(weights, Mapping) or not weights:
        raise InputError("has no 'network_weights' (not an nnU-Net checkpoint)", path)
    arrays: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"network_weights entry {name!r} is not a tensor", path)
        if not value.is_floating_point():
            raise InputError(f"network_weights entry {name!r} is {value.dtype}, not a floating-point tensor", path)
        arrays[name] = value.detach().to(torch.float32).numpy().copy()
    init_args = obj.get("init_args")
    configuration = init_args.get("configuration") if isinstance(init_args, Mapping) else None
    axes = obj.get("inference_allowed_mirroring_axes")
    return NnunetCheckpoint(
        weights=from_nnunet_state(arrays, str(path)),
        trainer_name=str(obj.get("trainer_name", "")),
        configuration=configuration if isinstance(configuration, str) else None,
        mirror_axes=tuple(int(a) for a in axes) if isinstance(axes, (list, tuple)) else None,
    )


def write_checkpoint(
    path: str | Path,
    state: Mapping[str, np.ndarray],
    *,
    init_args: Mapping[str, Any],
    trainer_name: str,
    mirror_axes: tuple[int, ...] | None,
) -> None:
    """Write `state` (fedseg names) as nnU-Net's checkpoint, atomically.

    Written: what the predictor reads, plus `current_epoch` so that nnU-Net's tools that
    print it work. Optimizer state is not written: a federation's optimizer state lives at
    each site, so the file is for prediction and for nnU-Net's `-pretrained_weights`
    fine-tuning, not for `--c` (continue training).
    """
    import torch  # lazily: start-up time of the commands that never touch a checkpoint

    # One tensor per fedseg parameter; its nnU-Net aliases share it, as in nnU-Net's own files.
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) for name, array in state.items()}
    checkpoint = {
        "network_weights": OrderedDict(to_nnunet_state(tensors)),
        "init_args": dict(init_args),
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes is not None else None,
        "current_epoch": 0,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)

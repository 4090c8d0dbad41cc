"""Parameter names: fedseg's U-Net <-> nnU-Net v2's PlainConvUNet (dynamic_network_architectures).

The two networks hold the same tensors; only the module paths differ:

    fedseg                                   nnU-Net (dynamic_network_architectures)
    encoder.stages.{s}.convs.{i}.conv.W      encoder.stages.{s}.0.convs.{i}.conv.W
    encoder.stages.{s}.convs.{i}.norm.W      encoder.stages.{s}.0.convs.{i}.norm.W
    decoder.stages.{j}.convs.{i}.conv.W      decoder.stages.{j}.convs.{i}.conv.W
    decoder.transpconvs.{j}.W                decoder.transpconvs.{j}.W
    decoder.seg_layers.{j}.W                 decoder.seg_layers.{j}.W

(W = weight | bias). nnU-Net's state dict also lists every tensor under aliases, because
one module is registered twice: each ConvDropoutNormReLU keeps its conv and norm in an
`all_modules` Sequential as well (conv at 0, norm at 1 when there is no dropout), and the
decoder keeps a reference to the encoder (`decoder.encoder.…`). nnU-Net loads with
`strict=True`, so an export writes every alias; an import reads the primary names and
checks that each alias holds the same values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedseg.errors import InputError

_FEDSEG_ENCODER = re.compile(r"^encoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$")
_FEDSEG_DECODER = re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$")
_SAME_IN_BOTH = re.compile(r"^decoder\.(transpconvs|seg_layers)\.(\d+)\.(weight|bias)$")

_NNUNET_ENCODER = re.compile(
    r"^(decoder\.)?encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm|all_modules\.\d+)\.(weight|bias)$"
)
_NNUNET_DECODER = re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm|all_modules\.\d+)\.(weight|bias)$")

# Position of conv and norm inside ConvDropoutNormReLU.all_modules: conv, [dropout], norm,
# nonlin. fedseg's U-Net has no dropout (nnU-Net's default plans have none either).
ALL_MODULES_INDEX = {"conv": 0, "norm": 1}
_MODULE_AT_INDEX = {f"all_modules.{i}": name for name, i in ALL_MODULES_INDEX.items()}


def nnunet_names(name: str) -> list[str]:
    """Every name nnU-Net's state dict holds the fedseg parameter `name` under; primary first."""
    m = _FEDSEG_ENCODER.match(name)
    if m:
        s, i, module, param = m.groups()
        primary = f"encoder.stages.{s}.0.convs.{i}.{module}.{param}"
        alias = f"encoder.stages.{s}.0.convs.{i}.all_modules.{ALL_MODULES_INDEX[module]}.{param}"
        return [primary, alias, f"decoder.{primary}", f"decoder.{alias}"]
    m = _FEDSEG_DECODER.match(name)
    if m:
        j, i, module, param = m.groups()
        return [name, f"decoder.stages.{j}.convs.{i}.all_modules.{ALL_MODULES_INDEX[module]}.{param}"]
    if _SAME_IN_BOTH.match(name):
        return [name]
    raise ValueError(f"{name!r} is not a parameter of fedseg's U-Net")


def fedseg_name(nnunet_name: str) -> tuple[str, bool]:
    """(fedseg name, is_primary) for a name in an nnU-Net PlainConvUNet state dict.

    Raises KeyError for a name that is not part of a PlainConvUNet with fedseg's layout.
    """
    m = _NNUNET_ENCODER.match(nnunet_name)
    if m:
        via_decoder, s, i, module, param = m.groups()
        base = _MODULE_AT_INDEX.get(module, module)
        if base not in ALL_MODULES_INDEX:
            raise KeyError(nnunet_name)
        return f"encoder.stages.{s}.convs.{i}.{base}.{param}", via_decoder is None and module == base
    m = _NNUNET_DECODER.match(nnunet_name)
    if m:
        j, i, module, param = m.groups()
        base = _MODULE_AT_INDEX.get(module, module)
        if base not in ALL_MODULES_INDEX:
            raise KeyError(nnunet_name)
        return f"decoder.stages.{j}.convs.{i}.{base}.{param}", module == base
    if _SAME_IN_BOTH.match(nnunet_name):
        return nnunet_name, True
    raise KeyError(nnunet_name)


def to_nnunet_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """fedseg state -> nnU-Net state dict (every alias present, as `load_state_dict(strict=True)` wants)."""
    out: dict[str, np.ndarray] = {}
    for name, array in state.items():
        for alias in nnunet_names(name):
            out[alias] = array
    return out


def from_nnunet_state(weights: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """nnU-Net state dict -> fedseg state, refusing names fedseg's U-Net does not have.

    `source` names the file in errors. An alias whose values differ from its primary name
    is refused: nnU-Net would load whichever comes last, so the file is ambiguous.
    """
    primaries: dict[str, np.ndarray] = {}
    aliases: dict[str, tuple[str, np.ndarray]] = {}
    for name, array in weights.items():
        try:
            target, is_primary = fedseg_name(name)
        except KeyError:
            raise InputError(
                f"parameter {name!r} is not part of nnU-Net's PlainConvUNet as fedseg builds it "
                "(conv, instance norm, leaky ReLU, no dropout)", source
            ) from None
        if is_primary:
            primaries[target] = array
        else:
            aliases[name] = (target, array)
    for name, (target, array) in aliases.items():
        primary = primaries.get(target)
        if primary is None:
            raise InputError(f"parameter {name!r} is an alias of {nnunet_names(target)[0]!r}, which is missing", source)
        if primary.shape != array.shape or not np.array_equal(primary, array):
            raise InputError(f"parameter {name!r} differs from {nnunet_names(target)[0]!r}, which it should alias", source)
    return primaries

"""The typed parameters of the model recipes, and the name rules they share with their
aggregation rules, without torch (the coordinator checks plans and aggregates without it).

Keys are those of `fedseg plan --set KEY=VALUE`; the checks and their refusals are
fedseg.typed_params'. Fields are declared in the order they are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedseg.data.channels import channel_keys, plan_channel_list, present_channels
from fedseg.typed_params import param

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fedseg.planning.plans import Plans

# -- MixMFL (fedseg.training.mixmfl_network, fedseg.training.mixmfl_trainer) -----------------

# Which of a site's representations query a missing sequence's memory: "tailored" = those of
# the sequences it holds, against prototypes keyed by them (the paper's "existing
# modality-specific representations"); "shared" = the modality-shared one; "both".
MEMORY_QUERIES = ("both", "tailored", "shared")


@dataclass(frozen=True)
class MixMFLParams:
    """The MixMFL network's and trainer's parameters (the paper's ablation switches, its λ1,
    λ2 and memory size). The aggregation rule's own keys (tailored, tailored_weighting) are
    not here."""

    memory: bool = param(True)            # the prototype memory (retrieval and its refresh)
    triplet: bool = param(True)           # the entropy triplet loss
    classifier: bool = param(True)        # the modality classifier's loss
    lambda_cls: float = param(0.5, minimum=0)         # the paper's λ1
    lambda_triplet: float = param(1e-4, minimum=0)    # the paper's λ2
    triplet_margin: float = param(1.0, minimum=0)
    memory_query: str = param("both", choices=MEMORY_QUERIES)   # key spaces a site queries
    memory_size: int = param(200, integer=True, positive=True)  # the paper's memory size per modality
    # k-means centres per sequence, stage, key space, site and round
    prototypes: int = param(16, integer=True, positive=True)


def sequences(plans: Plans) -> list[str]:
    """The federation's MRI sequences in the plan's channel order (the union over sites)."""
    return plan_channel_list(plans.channel_names)


def sequence_keys(plans: Plans) -> list[str]:
    """The parameter-name-safe key of each sequence (`tailored.<key>.*`, `memory.<key>.*`)."""
    return channel_keys(sequences(plans))


def present_indices(plans: Plans, site: str) -> list[int]:
    """Sorted indices (into `sequences(plans)`) of the sequences `site` holds."""
    return present_channels(sequences(plans), plans.site(site).channels)


# -- SAM (fedseg.training.sam, fedseg.training.sam_trainer) ----------------------------------

# Names of SAM's variants (fedseg.training.sam.SAM_CONFIGS), repeated here so that checking a
# plan does not import torch.
SAM_CONFIG_NAMES = ("tiny", "vit_b", "vit_h", "vit_l")
DEFAULT_SAM_CONFIG = "tiny"


@dataclass(frozen=True)
class SamParams:
    """The prompt-free SAM's parameters (`sam.*`); the first of each choice is the default."""

    config: str = param(DEFAULT_SAM_CONFIG, key="sam.config", choices=SAM_CONFIG_NAMES)
    checkpoint: str | None = param(None, key="sam.checkpoint", text=True, expects="a file path")
    checkpoint_sha256: str | None = param(None, key="sam.checkpoint_sha256", text=True, length=64,
                                          expects="a 64-character hex digest", show_value=False)
    lr: float | None = param(None, key="sam.lr", positive=True)
    optimizer: str = param("adamw", key="sam.optimizer", choices=("adamw", "adam"))
    lr_schedule: str = param("poly", key="sam.lr_schedule", choices=("poly", "constant"))
    adapter_init: str = param("zero", key="sam.adapter_init", choices=("zero", "default"))
    image_size: int | None = param(None, key="sam.image_size", integer=True, positive=True)


def is_adapter(name: str) -> bool:
    """An MSA adapter's tensor (fedseg.training.sam's names)."""
    return ".Space_Adapter." in name or ".MLP_Adapter." in name


def is_frozen_backbone(name: str) -> bool:
    """FedMSA's frozen part: the image encoder except its adapters, and the positional encoding."""
    return (name.startswith("image_encoder.") and not is_adapter(name)) or name.startswith("prompt_encoder.pe_layer.")


__all__ = ["DEFAULT_SAM_CONFIG", "MEMORY_QUERIES", "SAM_CONFIG_NAMES", "MixMFLParams", "SamParams",
           "is_adapter", "is_frozen_backbone", "present_indices", "sequence_keys", "sequences"]

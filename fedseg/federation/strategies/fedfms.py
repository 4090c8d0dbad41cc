"""FedFMS: federated SAM. `fedsam` fine-tunes everything; `fedmsa` trains MSA adapters + decoder.

Both build the prompt-free SAM of `fedseg.training.sam` from the plan's strategy params and
average by FedAvg's rule (Σ n_k w_k / Σ n_k, float64; `weighting=uniform` for a plain mean):

    sam.config      tiny | vit_b | vit_l | vit_h   (default tiny: a CPU-sized model)
    sam.checkpoint  path of a SAM checkpoint (.pth read with torch's tensors-only loader,
                    or .safetensors); the same path at every site
    sam.checkpoint_sha256   optional: refuse a checkpoint file with another hash, so every
                    site provably starts from the same backbone
    sam.image_size  encoder input size (default: the configuration's, 1024 for vit_*, 64 for
                    tiny); position embeddings of a checkpoint are interpolated to it
    sam.lr          AdamW learning rate (default 1e-2 for tiny, 1e-4 for vit_*, MSA's rate);
                    the trainer's poly schedule is applied to it
    sam.optimizer   adamw (default: AdamW with training.weight_decay) | adam (the paper's
                    Adam, betas 0.9 / 0.999, no weight decay)
    sam.lr_schedule poly (default: the trainer's poly decay) | constant (the paper names none)
    sam.adapter_init  zero (default: the adapters' output layers start at zero, so an adapted
                    encoder starts as the pretrained one) | default (MSA's code: PyTorch's
                    default init of every adapter layer)

The paper's recipe: `--set training.loss=bce --set sam.optimizer=adam --set
sam.lr_schedule=constant --set sam.adapter_init=default --set configuration.batch_size=6`.

fedmsa: the image encoder (except the adapters) is frozen and is not part of the model's
state at all: every site rebuilds it from `sam.checkpoint` (or, without a checkpoint, from
the plan seed) whenever it builds the network. So it is never in an update (its scope is
None), never in a round file, and never in the site's state folder: only adapters, the
mask decoder and the no-mask embedding travel (≈12 % of vit_b).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedseg.errors import InputError
from fedseg.federation.strategies.base import Manifest, ProposedRoutes, Strategy, case_weight, check_choice

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans

SAM_PARAMS = frozenset({"sam.config", "sam.checkpoint", "sam.checkpoint_sha256", "sam.image_size", "sam.lr",
                        "sam.optimizer", "sam.lr_schedule", "sam.adapter_init"})
# choice-valued params: (allowed values, the first is the default)
SAM_CHOICES = {"sam.optimizer": ("adamw", "adam"), "sam.lr_schedule": ("poly", "constant"),
               "sam.adapter_init": ("zero", "default")}
DEFAULT_SAM_CONFIG = "tiny"
# Names of SAM's variants (fedseg.training.sam.SAM_CONFIGS), repeated here so that checking a
# plan does not import torch.
SAM_CONFIG_NAMES = ("tiny", "vit_b", "vit_h", "vit_l")


def _frozen_backbone(name: str) -> bool:
    # the same rule as fedseg.training.sam.is_frozen_backbone, without importing torch
    adapter = ".Space_Adapter." in name or ".MLP_Adapter." in name
    return (name.startswith("image_encoder.") and not adapter) or name.startswith("prompt_encoder.pe_layer.")


GLOBAL_POOL = "global"


class _FedFMS(Strategy):
    adapters: bool = False
    known_params = frozenset({"weighting", "missing"}) | SAM_PARAMS

    def check_params(self, params: Mapping[str, Any]) -> None:
        super().check_params(params)
        check_choice(params, "weighting", ("n_cases", "uniform"))
        if params.get("missing") is not None:
            check_choice(params, "missing", ("zero",))
        config = params.get("sam.config", DEFAULT_SAM_CONFIG)
        if config not in SAM_CONFIG_NAMES:
            raise InputError(f"sam.config must be one of {', '.join(SAM_CONFIG_NAMES)}, got {config!r}")
        checkpoint = params.get("sam.checkpoint")
        if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
            raise InputError(f"sam.checkpoint must be a file path, got {checkpoint!r}")
        digest = params.get("sam.checkpoint_sha256")
        if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
            raise InputError("sam.checkpoint_sha256 must be a 64-character hex digest")
        lr = params.get("sam.lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise InputError(f"sam.lr must be a positive number, got {lr!r}")
        for key, allowed in SAM_CHOICES.items():
            if params.get(key, allowed[0]) not in allowed:
                raise InputError(f"{key} must be one of {', '.join(allowed)}, got {params[key]!r}")
        size = params.get("sam.image_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise InputError(f"sam.image_size must be a positive integer, got {size!r}")

    def requires_same_channels(self, params: Mapping[str, Any]) -> bool:
        # `missing=zero`: sites hold subsets of the plan's channels, the absent ones zero
        return params.get("missing") != "zero"

    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        # fedmsa: the frozen backbone is rebuilt by every site and never travels
        tensors = {site: {name: (GLOBAL_POOL, name) for name in manifest if not (self.adapters and _frozen_backbone(name))}
                   for site, manifest in manifests.items()}
        return ProposedRoutes(tensors, model_pools=frozenset({GLOBAL_POOL}))

    def sum_weight(self, plans: Plans, pool: str, n_cases: int) -> float:
        return case_weight(plans.strategy.params, n_cases)


class FedSAM(_FedFMS):
    name = "fedsam"
    description = "federated SAM: every parameter fine-tuned and averaged (FedAvg)"
    recipe = "sam_full"
    adapters = False


class FedMSA(_FedFMS):
    name = "fedmsa"
    description = "federated SAM with MSA adapters: frozen encoder, adapters + decoder averaged (FedAvg)"
    recipe = "sam_adapters"
    adapters = True

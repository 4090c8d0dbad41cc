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
from fedseg.federation.strategies.fedavg import GLOBAL_POOL, FedAvg

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


class _FedFMS(FedAvg):
    adapters: bool = False
    known_params = FedAvg.known_params | SAM_PARAMS
    supports_regions = False   # the SAM mask decoder's head is softmax over classes

    def check_params(self, params: Mapping[str, Any]) -> None:
        super().check_params(params)
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

    def network(self, plans: Plans, site: str) -> Any:
        from fedseg.training.sam import build_sam_segmenter, sam_config

        params = plans.strategy.params
        self.check_params(params)
        config = sam_config(params.get("sam.config", DEFAULT_SAM_CONFIG), params.get("sam.image_size"))
        return build_sam_segmenter(
            config, plans.n_channels, plans.n_classes,
            adapters=self.adapters, freeze_backbone=self.adapters,
            checkpoint=params.get("sam.checkpoint"), checkpoint_sha256=params.get("sam.checkpoint_sha256"),
            seed=plans.seed, zero_adapters=params.get("sam.adapter_init", "zero") == "zero",
        )

    def trainer_class(self, plans: Plans) -> Any:
        from fedseg.training.sam_trainer import SamTrainer

        return SamTrainer

    def scope(self, plans: Plans, site: str, name: str) -> str | None:
        if self.adapters and _frozen_backbone(name):
            return None
        return GLOBAL_POOL


class FedSAM(_FedFMS):
    name = "fedsam"
    description = "federated SAM: every parameter fine-tuned and averaged (FedAvg)"
    adapters = False


class FedMSA(_FedFMS):
    name = "fedmsa"
    description = "federated SAM with MSA adapters: frozen encoder, adapters + decoder averaged (FedAvg)"
    adapters = True

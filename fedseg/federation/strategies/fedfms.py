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

from fedseg.federation.strategies.base import GlobalMean


class FedSAM(GlobalMean):
    name = "fedsam"
    description = "federated SAM: every parameter fine-tuned and averaged (FedAvg)"
    recipe = "sam_full"


class FedMSA(GlobalMean):
    name = "fedmsa"
    description = "federated SAM with MSA adapters: frozen encoder, adapters + decoder averaged (FedAvg)"
    recipe = "sam_adapters"

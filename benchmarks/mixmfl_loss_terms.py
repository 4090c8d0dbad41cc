"""How much each MDM-MixMFL loss term moves the encoders: the figures behind the ablation.

Trains `mixmfl` on the `mixmfl` preset (6 sites) and, at every training step, measures the
norm of each weighted term's gradient on the modality-shared and on the modality-tailored
encoders: ‖∇ L_seg‖, ‖λ1 ∇ L_cls‖, ‖λ2 ∇ L_triplet‖. Prints the mean over the first and the
last steps, and each decoupling term's gradient as a fraction of the segmentation one, and
the modality classifier's accuracy on the tailored and on the shared representations of the
step's batch (chance: 1 / 2 at a two-sequence site).

    .venv/bin/python benchmarks/mixmfl_loss_terms.py --out /tmp/mixmfl_terms [--rounds 3 --iterations 10]

The measurement wraps MixMFLTrainer.train_step in this process (one extra forward and six
extra gradient passes per step; the training itself is unchanged). Single-threaded torch, augmentation
in-process.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

PARTS = ("shared", "tailored")
TERMS = ("seg", "cls", "triplet")


def gradient_norm(loss, params) -> float:
    import torch

    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def measuring_train_step(original, records: list[dict]):
    import torch

    def train_step(self, batch: dict) -> float:
        net = self.network
        outputs, aux = net(batch["data"].to(self.device), return_aux=True)
        target = batch["target"]
        target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
        seg = self.compute_loss(outputs, target)
        cls, triplet = self.decoupling_losses(aux)
        weighted = {"seg": seg, "cls": self.lambda_cls * cls, "triplet": self.lambda_triplet * triplet}
        row = {"seg": float(seg.detach()), "cls": float(cls.detach()), "triplet": float(triplet.detach())}
        with torch.no_grad():
            for kind in ("tailored", "shared"):
                hits = [(net.classify(aux[f"{kind}_raw"][m]).argmax(1) == m).float().mean() for m in net.present]
                row[f"acc_{kind}"] = float(sum(hits) / len(hits))
        for part in PARTS:
            params = [p for name, p in net.named_parameters() if name.startswith(part + ".")]
            for term, loss in weighted.items():
                row[f"grad_{part}_{term}"] = gradient_norm(loss, params)
        self.network.zero_grad(set_to_none=True)
        records.append(row)
        return original(self, batch)

    return train_step


def summary(rows: list[dict]) -> dict[str, float]:
    return {key: statistics.mean(r[key] for r in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the synthetic sites and the run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234, help="training seed (data seed 0)")
    parser.add_argument("--patch", default="16,16,16", help="configuration.patch_size (small: CPU time)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra plan parameter, e.g. lambda_triplet=0.1 (repeatable)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedseg.synth import generate
    from fedseg.federation.single_machine import SimulationConfig, simulate
    from fedseg.training.mixmfl_trainer import MixMFLTrainer

    sites = args.out / "sites"
    if not sites.is_dir():
        generate(sites, preset="mixmfl", seed=0)
    records: list[dict] = []
    MixMFLTrainer.train_step = measuring_train_step(MixMFLTrainer.train_step, records)
    run_name = f"run_seed{args.seed}" + "".join(f"_{kv}" for kv in args.sets)
    simulate(SimulationConfig(sites, "mixmfl", args.rounds, args.out / run_name, iterations=args.iterations,
                              overrides={"configuration.patch_size": args.patch, **dict(kv.split("=", 1) for kv in args.sets)},
                              seed=args.seed, workers=0))

    window = max(1, len(records) // 4)
    print(f"{len(records)} training steps (6 sites x {args.rounds} rounds x {args.iterations} iterations)")
    print("| steps | L_seg | L_cls | L_triplet | part | ‖∇L_seg‖ | ‖λ1∇L_cls‖ (share) | ‖λ2∇L_triplet‖ (share) | classifier accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rows in ((f"first {window}", records[:window]), (f"last {window}", records[-window:])):
        s = summary(rows)
        for part in PARTS:
            seg = s[f"grad_{part}_seg"]
            cls, tri = s[f"grad_{part}_cls"], s[f"grad_{part}_triplet"]
            print(f"| {label} | {s['seg']:.3f} | {s['cls']:.3f} | {s['triplet']:.3f} | {part} | {seg:.3g} | "
                  f"{cls:.3g} ({cls / seg:.1%}) | {tri:.2g} ({tri / seg:.2%}) | {s[f'acc_{part}']:.2f} |")


if __name__ == "__main__":
    main()

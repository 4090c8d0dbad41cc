"""FedFMS table: Dice and bytes exchanged per round for fedmsa, fedsam and the U-Net under fedavg.

Generates the 2D `fedfms` preset (3 sites of 64x64 fundus-like images), runs `simulate` for
each strategy with the same rounds and iterations, and prints a Markdown table:
parameters exchanged, bytes per site per round (update sent, model received), validation
Dice per round (mean over sites) and final test Dice (mean over sites and foreground labels).
The last two rows train with the paper's recipe (PAPER_RECIPE); `--runs` picks rows.

    python benchmarks/fedfms_table.py [--rounds 4] [--iterations 40] [--out /tmp/fedfms_bench]

SAM models use the tiny configuration without a checkpoint (trained from the seed), so the
absolute Dice says little about pretrained SAM; the bytes column is the point: FedMSA sends
adapters + decoder only. About 3-6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from fedseg.synth import generate
from fedseg.federation.single_machine import SimulationConfig, simulate

# FedFMS' own training recipe: BCE, Adam (0.9, 0.999) at a constant rate, batch 6, MSA's
# default-initialised adapters (fedseg's defaults: Dice + CE, AdamW with poly decay, the
# plan's batch, zero-initialised adapter outputs).
PAPER_RECIPE = {"training.loss": "bce", "sam.optimizer": "adam", "sam.lr_schedule": "constant",
                "sam.adapter_init": "default", "configuration.batch_size": 6}
RUNS = (
    # (name, label, strategy, overrides)
    ("fedmsa", "FedMSA (SAM tiny + adapters)", "fedmsa", {"sam.config": "tiny"}),
    ("fedsam", "FedSAM (SAM tiny, full)", "fedsam", {"sam.config": "tiny"}),
    ("unet", "U-Net (fedavg, nnU-Net 2d plan)", "fedavg", {}),
    ("fedmsa_paper", "FedMSA, the paper's recipe", "fedmsa", {"sam.config": "tiny", **PAPER_RECIPE}),
    ("fedsam_paper", "FedSAM, the paper's recipe", "fedsam", {"sam.config": "tiny", **PAPER_RECIPE}),
)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedfms_bench"))
    parser.add_argument("--runs", nargs="+", choices=[run[0] for run in RUNS], default=None,
                        help="only these rows (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)   # a shared machine: one core per run

    if args.out.exists():
        shutil.rmtree(args.out)
    sites = args.out / "sites"
    generate(sites, preset="fedfms", seed=0)

    rows = []
    for name, label, strategy, overrides in RUNS:
        if args.runs and name not in args.runs:
            continue
        start = time.monotonic()
        result = simulate(SimulationConfig(
            sites_root=sites, strategy=strategy, rounds=args.rounds, run_dir=args.out / name,
            configuration="2d", iterations=args.iterations, overrides={k: str(v) for k, v in overrides.items()},
            seed=args.seed, workers=0,
        ))
        seconds = time.monotonic() - start
        plans = json.loads((Path(result.run_dir) / "plans.json").read_text())
        manifest = plans["extra"]["manifests"][plans["default_configuration"]]
        n_params = sum(int(torch.Size(e["shape"]).numel()) for e in manifest.values())
        uploads = [t["upload"] for per_round in result.traffic.values() for t in per_round if t]
        downloads = [t["download"] for per_round in result.traffic.values() for t in per_round if t]
        val_per_round = [_mean(values) for values in zip(*result.val_dice.values())]
        test = _mean([(m.get("foreground_mean") or {}).get("dice") for m in result.test_metrics.values()])
        rows.append((label, n_params, _mean(uploads), _mean(downloads), val_per_round, test, seconds))

    print(f"\n{args.rounds} rounds x {args.iterations} iterations per site, 3 sites (preset fedfms, 64x64)\n")
    print("| model / strategy | parameters exchanged | update sent per site per round | model received per site per round | val Dice per round | test Dice | time |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for label, n_params, up, down, val, test, seconds in rows:
        print(f"| {label} | {n_params:,} | {up / 1024:,.0f} KiB | {down / 1024:,.0f} KiB | "
              f"{' → '.join(f'{v:.2f}' for v in val)} | {test:.3f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()

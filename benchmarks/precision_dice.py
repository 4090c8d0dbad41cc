"""Does bfloat16 training give the Dice of float32 training? `simulate --precision` on a preset.

The same federation (fedavg, same plan, same seed, same rounds and iterations) trained once in
float32 and once with bfloat16 autocast (`--precision bf16`), for each seed; prints each site's
test Dice and the mean over sites per precision, and the difference per seed and over seeds
last. Single-threaded torch so that the figures do not depend on the core count.

    nice .venv/bin/python benchmarks/precision_dice.py --work /tmp/precision_dice [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def run(args: argparse.Namespace, sites: Path, seed: int, precision: str) -> dict[str, float]:
    from fedseg.federation.single_machine import SimulationConfig, simulate

    run_dir = args.work / f"seed{seed}_{precision}"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = simulate(SimulationConfig(
        sites_root=sites, strategy="fedavg", rounds=args.rounds, run_dir=run_dir, iterations=args.iterations,
        seed=seed, workers=0, device="cpu", precision=precision,
    ))
    dice = {site: m["foreground_mean"]["dice"] for site, m in sorted(result.test_metrics.items())}
    print(f"seed {seed} {precision}: " + " ".join(f"{s} {d:.4f}" for s, d in dice.items())
          + f"  mean {sum(dice.values()) / len(dice):.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/precision_dice"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    import torch

    from fedseg.synth import generate
    from measure import load_average

    torch.set_num_threads(1)
    sites = args.work / "sites"
    if not sites.is_dir():
        generate(sites, preset=args.preset, seed=0)
    print(f"preset {args.preset}, fedavg, {args.rounds} rounds x {args.iterations} iterations; load {load_average()}")
    gaps = []
    for seed in args.seeds:
        means = {}
        for precision in ("fp32", "bf16"):
            dice = run(args, sites, seed, precision)
            means[precision] = sum(dice.values()) / len(dice)
        gaps.append(means["bf16"] - means["fp32"])
        print(f"seed {seed}: bf16 - fp32 mean test Dice = {gaps[-1]:+.4f}", flush=True)
    print(f"load after: {load_average()}")
    print(f"result: bf16 - fp32 mean test Dice over {len(gaps)} seeds = {sum(gaps) / len(gaps):+.4f} "
          f"(per seed {', '.join(f'{g:+.4f}' for g in gaps)}; target: within 0.01)")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

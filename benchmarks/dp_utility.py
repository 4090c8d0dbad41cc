"""Utility of client-level DP (DP-FedAvg) on the `tiny` preset: test Dice at ε ≈ 1, 4, 8 and without DP.

Every arm is a whole `simulate` run (fedavg, same seed, same rounds and iterations); the DP
arms differ only in the noise multiplier σ, found by bisection so that the RDP accountant
gives the target ε at δ = 1e-5 after the planned rounds. A last arm with a very small σ shows
what the clipping alone costs. Test Dice = mean foreground Dice over the three sites' test sets.
Secure aggregation does not change these numbers (the masked sum equals the plain one, and
the sites' noise shares add up to the same σ·clip), so the arms run without it.

    nice .venv/bin/python benchmarks/dp_utility.py --work /tmp/dp_utility
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def sigma_for(target: float, rounds: int, delta: float) -> float:
    from fedseg.federation.dp import epsilon

    low, high = 0.3, 200.0
    for _ in range(60):
        mid = (low * high) ** 0.5
        if epsilon([mid] * rounds, delta) > target:
            low = mid
        else:
            high = mid
    return high


def run_arm(name: str, overrides: dict, args, sites: Path) -> dict:
    from fedseg.federation.single_machine import SimulationConfig, simulate

    run_dir = args.work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = simulate(SimulationConfig(
        sites_root=sites, strategy="fedavg", rounds=args.rounds, run_dir=run_dir, iterations=args.iterations,
        overrides={k: str(v) for k, v in overrides.items()}, workers=0,
    ))
    dice = [m["foreground_mean"]["dice"] for m in result.test_metrics.values()]
    import json

    record = json.loads((run_dir / f"round_{args.rounds:03d}" / "aggregate.json").read_text()).get("privacy") or {}
    eps = (record.get("dp") or {}).get("epsilon")
    return {"arm": name, "sigma": overrides.get("dp.noise_multiplier"), "epsilon": eps,
            "dice": sum(dice) / len(dice), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dp_utility"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--targets", default="1,4,8")
    args = parser.parse_args()
    from measure import load_average

    from fedseg.synth import generate

    print(f"load average before: {load_average()}")
    args.work.mkdir(parents=True, exist_ok=True)
    sites = args.work / "sites"
    if not sites.is_dir():
        generate(sites, preset="tiny", seed=0)
    arms = [("no_dp", {})]
    for target in (float(t) for t in args.targets.split(",")):
        sigma = sigma_for(target, args.rounds, 1e-5)
        arms.append((f"eps_{target:g}", {"dp.clip": args.clip, "dp.noise_multiplier": round(sigma, 4)}))
    arms.append(("sigma_0.001", {"dp.clip": args.clip, "dp.noise_multiplier": 0.001}))
    rows = [run_arm(name, overrides, args, sites) for name, overrides in arms]
    print(f"fedavg, tiny preset, {args.rounds} rounds x {args.iterations} iterations, dp.clip {args.clip}, δ 1e-5 (RDP)")
    print(f"{'arm':<12} {'sigma':>8} {'epsilon':>10} {'test Dice':>10} {'seconds':>8}")
    for r in rows:
        sigma = "-" if r["sigma"] is None else f"{r['sigma']:.4g}"
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        print(f"{r['arm']:<12} {sigma:>8} {eps:>10} {r['dice']:>10.3f} {r['seconds']:>8.0f}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()

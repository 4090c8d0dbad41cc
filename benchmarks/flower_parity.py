"""FedAvg parity with Flower: fedseg's aggregate vs flwr.server.strategy.aggregate.aggregate.

Two steps, because Flower is not a dependency of fedseg and lives in its own environment:

    # 1. with fedseg's environment: random float32 updates from 3 sites + `aggregate_round`
    .venv/bin/python benchmarks/flower_parity.py make /tmp/parity
    # 2. with an environment that has flwr (+ numpy, safetensors), e.g.
    #    python3 -m venv /tmp/flwr && /tmp/flwr/bin/pip install "flwr>=1.8,<2" numpy safetensors
    /tmp/flwr/bin/python benchmarks/flower_parity.py compare /tmp/parity/round_001

`compare` reads the same update files with safetensors, weights them by their `n_cases`
metadata, runs Flower's aggregate() and prints the largest absolute difference to
round_001/models/global.safetensors. Flower accumulates in float32 and fedseg in float64,
so the difference is float32 rounding (around 1e-7 for unit-scale weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def make(out: Path, n_sites: int = 3, seed: int = 0) -> None:
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.routes import attach_routes
    from fedseg.federation.site_update import write_site_update
    from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec

    shapes = {"encoder.stages.0.conv.weight": [32, 1, 3, 3, 3], "encoder.stages.0.conv.bias": [32],
              "encoder.stages.1.conv.weight": [64, 32, 3, 3, 3], "decoder.seg_layers.0.weight": [2, 32, 1, 1, 1]}
    manifest = {name: {"shape": shape, "dtype": "float32"} for name, shape in shapes.items()}
    network = NetworkSpec(2, [32, 64], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], [1])
    config = ConfigurationPlan("3d_fullres", [1.0, 1.0, 1.0], [16, 16, 16], [16.0, 16.0, 16.0], 2,
                               ["ZScoreNormalization"], [False], network)
    rng = np.random.default_rng(seed)
    sites = {f"site{i}": int(rng.integers(2, 40)) for i in range(n_sites)}
    plans = attach_routes(Plans("parity", {"0": "T1"}, {"background": 0, "fg": 1}, ".nii.gz", {},
                                {s: SiteInfo("MRI", ["T1"], n) for s, n in sites.items()}, StrategySpec("fedavg"),
                                {"3d_fullres": config}, "3d_fullres", extra={"manifests": {"3d_fullres": manifest}}))
    updates = []
    for site in sites:
        state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        path = out / "round_001" / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, state, path, round_index=1, n_iterations=1)
        updates.append(path)
    aggregate_round(plans, updates, out / "round_001")
    print(f"wrote {len(updates)} updates and the fedseg aggregate under {out / 'round_001'}")


def compare(round_dir: Path) -> float:
    from flwr.server.strategy.aggregate import aggregate
    from safetensors import safe_open

    results = []
    names: list[str] | None = None
    for path in sorted((round_dir / "updates").glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            names = names or sorted(handle.keys())
            n_cases = json.loads(handle.metadata()["n_cases"])
            results.append(([handle.get_tensor(n) for n in names], n_cases))
    flower = dict(zip(names or [], aggregate(results)))
    with safe_open(str(round_dir / "models" / "global.safetensors"), framework="numpy") as handle:
        diffs = {n: float(np.max(np.abs(handle.get_tensor(n).astype(np.float64) - flower[n]))) for n in flower}
    worst = max(diffs.values())
    print(f"{len(results)} sites, {len(diffs)} tensors, {sum(flower[n].size for n in flower)} values")
    print(f"max |fedseg - flower| = {worst:.3e}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make")
    p_make.add_argument("out", type=Path)
    p_compare = sub.add_parser("compare")
    p_compare.add_argument("round_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.out)
        return 0
    worst = compare(args.round_dir)
    # float32 rounding of Flower's accumulation is the only expected difference
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())

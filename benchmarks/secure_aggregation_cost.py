"""Cost of secure aggregation per round, against the plain file protocol on the same weights.

For K sites holding a fedavg model of P float32 parameters (default: the `tiny` preset's
U-Net, 1.35 M), with random weights (the cost does not depend on their values):
  site      time to write one update: plain float32 vs masked (fixed point + K-1 ChaCha20
            masks, X25519 + HKDF per pair), per site
  bytes     one update file: float32 vs 64-bit ring words
  aggregate `aggregate_round` over the K updates: plain weighted mean vs modular sum
  dropout   one site missing: the K-1 survivors' recovery files + `aggregate_round` removing
            its masks
Each time is the best of --repeat runs (wall time, the machine is shared) with the CPU time of
that run.

    nice .venv/bin/python benchmarks/secure_aggregation_cost.py --sites 3,8
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

TINY_PRESET_PARAMETERS = 1_356_804   # float parameters of the `tiny` preset's 3d_fullres U-Net


def make_plans(sites: list[str], n_parameters: int, params: dict):
    from fedseg.federation.routes import attach_routes
    from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec

    # a few tensors of a U-Net's typical sizes, adding up to n_parameters
    sizes = [n_parameters // 2, n_parameters // 4, n_parameters // 8]
    sizes.append(n_parameters - sum(sizes))
    manifest = {f"stage{i}.weight": {"shape": [s], "dtype": "float32"} for i, s in enumerate(sizes)}
    network = NetworkSpec(n_stages=1, features_per_stage=[4], kernel_sizes=[[3, 3]], strides=[[1, 1]],
                          n_conv_per_stage=[1], n_conv_per_stage_decoder=[])
    config = ConfigurationPlan(name="2d", spacing=[1.0, 1.0], patch_size=[32, 32], median_image_size_in_voxels=[32, 32],
                               batch_size=2, normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
                               network=network)
    return attach_routes(Plans(dataset_name="bench", channel_names={"0": "T1"}, labels={"background": 0, "lesion": 1}, file_ending=".nii.gz",
                 fingerprint={}, sites={s: SiteInfo("MRI", ["T1"], 10 + i) for i, s in enumerate(sites)},
                 strategy=StrategySpec("fedavg", params), configurations={"2d": config}, default_configuration="2d",
                 extra={"manifests": {"2d": manifest}}))


def timed(fn, repeat: int) -> tuple[float, float, object]:
    best = (float("inf"), 0.0, None)
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best[0]:
            best = (wall, cpu, result)
    return best


def measure(n_sites: int, n_parameters: int, repeat: int, work: Path) -> dict:
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.site_update import write_site_update
    from fedseg.federation.privacy import SitePrivacy, plan_privacy, reveal_seeds
    from fedseg.federation.secure_aggregation import load_agreement_key
    from fedseg.federation.signing import generate_key
    from fedseg.federation.strategies import get_strategy

    sites = [f"site_{i:02d}" for i in range(n_sites)]
    keys = work / "keys"
    for site in sites:
        generate_key(site, keys)
    plain = make_plans(sites, n_parameters, {})
    secure = plan_privacy(make_plans(sites, n_parameters, {"secure_aggregation": True}), get_strategy("fedavg"), keys)
    rng = np.random.default_rng(0)
    states = {s: {n: (rng.standard_normal(e["shape"]) * 0.05).astype(np.float32)
                  for n, e in plain.extra["manifests"]["2d"].items()} for s in sites}
    agreement = {s: load_agreement_key(keys / f"{s}.key") for s in sites}

    def write(plans, folder: Path, masked: bool) -> list[Path]:
        paths = []
        for site in sites:
            path = folder / f"{site}.safetensors"
            privacy = SitePrivacy(agreement_key=agreement[site]) if masked else None
            write_site_update(plans, site, states[site], path, round_index=1, n_iterations=1, privacy=privacy)
            paths.append(path)
        return paths

    out: dict = {"sites": n_sites, "parameters": n_parameters}
    for label, plans, masked in (("plain", plain, False), ("secure", secure, True)):
        wall, cpu, paths = timed(lambda: write(plans, work / label / "updates", masked), repeat)
        out[f"{label}_site_s"] = (wall / n_sites, cpu / n_sites)
        out[f"{label}_bytes"] = paths[0].stat().st_size

        def aggregate():
            shutil.rmtree(work / label / "round", ignore_errors=True)
            return aggregate_round(plans, paths, work / label / "round")
        wall, cpu, _ = timed(aggregate, repeat)
        out[f"{label}_aggregate_s"] = (wall, cpu)

    paths = sorted((work / "secure" / "updates").glob("*.safetensors"))
    survivors, dropped = paths[:-1], sites[-1]

    def recover():
        shutil.rmtree(work / "dropout", ignore_errors=True)
        files = [reveal_seeds(secure, agreement[s], 1, [dropped], work / "dropout" / "recovery" / f"{s}.json") for s in sites[:-1]]
        return aggregate_round(secure, survivors, work / "dropout" / "round", recovery=files)
    wall, cpu, _ = timed(recover, repeat)
    out["dropout_aggregate_s"] = (wall, cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="3,8", help="comma-separated site counts")
    parser.add_argument("--parameters", type=int, default=TINY_PRESET_PARAMETERS)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from measure import load_average

    print(f"load average before: {load_average()}")
    rows = []
    for n_sites in (int(s) for s in args.sites.split(",")):
        work = Path(tempfile.mkdtemp(prefix="secagg_cost_"))
        try:
            rows.append(measure(n_sites, args.parameters, args.repeat, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.parameters} float32 parameters; best of {args.repeat}; wall s (cpu s)")
    print(f"{'sites':>5} {'update plain':>14} {'update masked':>15} {'bytes plain':>12} {'bytes masked':>13} "
          f"{'aggr plain':>13} {'aggr masked':>13} {'aggr 1 dropped':>15}")
    for r in rows:
        def f(pair):
            return f"{pair[0]:.3f} ({pair[1]:.3f})"
        print(f"{r['sites']:>5} {f(r['plain_site_s']):>14} {f(r['secure_site_s']):>15} {r['plain_bytes']:>12} "
              f"{r['secure_bytes']:>13} {f(r['plain_aggregate_s']):>13} {f(r['secure_aggregate_s']):>13} "
              f"{f(r['dropout_aggregate_s']):>15}")
    for r in rows:
        print(f"{r['sites']} sites: masked/plain — site write x{r['secure_site_s'][0] / r['plain_site_s'][0]:.2f}, "
              f"bytes x{r['secure_bytes'] / r['plain_bytes']:.2f}, aggregate x{r['secure_aggregate_s'][0] / r['plain_aggregate_s'][0]:.2f}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()

"""Local-only vs fedavg (one common plan) vs asymfedavg (per-site plans) on the `fednnunet` preset.

Runs `fedseg simulate` once per row of STRATEGIES (local-only with each site's own plan and
with the common plan, fedavg, asymfedavg with its defaults, with `decoder_match=bottleneck`,
with the earlier rule (bottleneck, shapes only), and with `aligned_init=false`; `--runs`
picks a subset) on the same synthetic
sites (1, 2.5 and 4 mm slices) with the same rounds, iterations and seed, then prints a markdown table of each site's test Dice and
HD95 (foreground mean; HD95 in mm). With several `--seeds` (each a new draw of the data and
of training) it also prints the Dice averaged over seeds. Single-threaded torch: a few
minutes per seed on 2 CPU cores.

    .venv/bin/python benchmarks/asymfedavg_table.py                      # defaults below
    .venv/bin/python benchmarks/asymfedavg_table.py --seeds 0 1 2 --keep /tmp/afa   # 3 seeds + mean
    .venv/bin/python benchmarks/asymfedavg_table.py --train-cases 3 --rounds 8 --iterations 15 ...  # data-limited

Seeds are independent: `--seeds 0 --keep DIR` and `--seeds 1 --keep DIR` can run as parallel
processes; a last call with all seeds and the same --keep reuses their runs and prints the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (run name, strategy, table label, extra simulate arguments). "local only (own plan)" is what
# a hospital training alone would have: nnU-Net planned from its own fingerprint.
STRATEGIES = (
    ("local_own", "local", "local only (own plan)", ("--set", "configuration.per_site=true")),
    ("local", "local", "local only (common plan)", ()),
    ("fedavg", "fedavg", "fedavg (common plan)", ()),
    ("asymfedavg", "asymfedavg", "asymfedavg (per-site plans)", ()),
    ("asymfedavg_bottleneck", "asymfedavg", "asymfedavg, decoder_match=bottleneck",
     ("--set", "decoder_match=bottleneck")),
    ("asymfedavg_shapes_only", "asymfedavg", "asymfedavg, bottleneck + match_strides=false (the earlier rule)",
     ("--set", "decoder_match=bottleneck", "--set", "match_strides=false")),
    ("asymfedavg_match_inputs", "asymfedavg", "asymfedavg, match_inputs=true", ("--set", "match_inputs=true")),
    ("asymfedavg_unaligned", "asymfedavg", "asymfedavg, aligned_init=false", ("--set", "aligned_init=false")),
)


def fedseg_command() -> list[str]:
    return [sys.executable, "-m", "fedseg.cli.main"]


def run(args: argparse.Namespace, work: Path) -> dict[str, dict[str, dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    sites = work / "sites"
    if not sites.is_dir():
        subprocess.run([*fedseg_command(), "synth", str(sites), "--preset", "fednnunet", "--seed", str(args.seed), "--quiet"],
                       check=True, env=env)
        if args.train_cases is not None:
            keep_training_cases(sites, args.train_cases)
    results: dict[str, dict[str, dict]] = {}
    for run_name, strategy, _label, extra in selected(args):
        run_dir = work / f"run_{run_name}"
        start = time.monotonic()
        command = [
            *fedseg_command(), "simulate", str(sites), "--strategy", strategy, "--rounds", str(args.rounds),
            "--iterations", str(args.iterations), "--workers", "0", "--seed", str(args.seed), "-o", str(run_dir), "--quiet",
            *extra,
        ]
        if not (run_dir / "report" / "metrics.json").is_file():   # a kept work folder reuses finished runs
            subprocess.run(command, check=True, env=env)
            print(f"{run_name}: {time.monotonic() - start:.0f} s", file=sys.stderr)
        results[run_name] = {
            site.name: json.loads((run_dir / "report" / f"metrics_{site.name}.json").read_text())["foreground_mean"]
            for site in sorted(sites.iterdir()) if (site / "dataset.json").is_file()
        }
    return results


def keep_training_cases(sites: Path, n: int) -> None:
    """The data-limited variant: keep each site's first `n` training cases (test cases unchanged)."""
    for site in sorted(p for p in sites.iterdir() if (p / "dataset.json").is_file()):
        cases = sorted({f.name.split("_0000")[0] for f in (site / "imagesTr").iterdir()})
        for case in cases[n:]:
            for folder in ("imagesTr", "labelsTr"):
                for f in (site / folder).glob(f"{case}[_.]*"):
                    f.unlink()
        body = json.loads((site / "dataset.json").read_text())
        body["numTraining"] = min(n, len(cases))
        (site / "dataset.json").write_text(json.dumps(body, indent=2))


def selected(args: argparse.Namespace) -> list[tuple]:
    return [row for row in STRATEGIES if not args.runs or row[0] in args.runs]


def shared_summary(work: Path) -> str:
    """Per-site plan and shared-tensor counts of the asymfedavg run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedseg.planning.plans import load_plans

    from fedseg.federation.routes import route_table

    plans = load_plans(work / "run_asymfedavg" / "plans.json")
    routes = route_table(plans)
    shared = {site: routes.sent(site) for site in routes.sites}
    lines = ["| site | spacing (mm) | patch | stages | shared / total tensors |", "|---|---|---|---|---|"]
    for site in sorted(plans.sites):
        cfg = plans.configuration_for(site)
        total = len(plans.extra["manifests"][plans.sites[site].configuration])
        spacing = "x".join(f"{s:g}" for s in (round(v, 2) for v in cfg.spacing))
        lines.append(f"| {site} | {spacing} | {'x'.join(map(str, cfg.patch_size))} | {cfg.network.n_stages} | "
                     f"{len(shared[site])} / {total} |")
    return "\n".join(lines)


def table(results: dict[str, dict[str, dict]]) -> str:
    """Per-site Dice and HD95 of every run in `results`."""
    sites = sorted(next(iter(results.values())))
    header = "| strategy | " + " | ".join(f"{s} Dice | {s} HD95" for s in sites) + " | mean Dice |"
    lines = [header, "|---" * (2 * len(sites) + 2) + "|"]
    for run_name, _strategy, label, _extra in STRATEGIES:
        if run_name not in results:
            continue
        row = results[run_name]
        cells = []
        for site in sites:
            dice, hd95 = row[site].get("dice"), row[site].get("hd95")
            cells.append("n/a" if dice is None else f"{dice:.3f}")
            cells.append("n/a" if hd95 is None else f"{hd95:.1f}")
        dices = [row[s]["dice"] for s in sites if row[s].get("dice") is not None]
        mean = sum(dices) / len(dices) if dices else float("nan")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} |")
    return "\n".join(lines)


def mean_table(per_seed: dict[int, dict[str, dict[str, dict]]]) -> str:
    """Dice per site averaged over seeds, and per strategy on how many seeds it reached the
    local-only (own plan) Dice at every site."""
    seeds = sorted(per_seed)
    sites = sorted(next(iter(per_seed[seeds[0]].values())))
    header = "| strategy | " + " | ".join(f"{s} Dice" for s in sites) + " | mean Dice | seeds with every site >= local own |"
    lines = [header, "|---" * (len(sites) + 3) + "|"]
    for run_name, _strategy, label, _extra in STRATEGIES:
        if run_name not in per_seed[seeds[0]]:
            continue
        means = [sum(per_seed[k][run_name][s]["dice"] for k in seeds) / len(seeds) for s in sites]
        reached = sum(all(per_seed[k][run_name][s]["dice"] >= per_seed[k]["local_own"][s]["dice"] for s in sites) for k in seeds)
        lines.append(f"| {label} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {sum(means) / len(means):.3f} | {reached} / {len(seeds)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10, help="iterations per site per round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the synthetic data and of training; several print a mean table as well")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--train-cases", type=int, default=None,
                        help="data-limited variant: keep only this many training cases per site (test cases unchanged)")
    parser.add_argument("--runs", nargs="+", choices=[row[0] for row in STRATEGIES], default=None,
                        help="only these rows (default: all); local_own is needed for the mean table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep if args.keep is not None else Path(tmp)
        per_seed = {}
        for seed in args.seeds:
            work = root / f"seed{seed}"
            work.mkdir(parents=True, exist_ok=True)
            args.seed = seed
            per_seed[seed] = run(args, work)
            print(f"seed {seed}\n\n" + shared_summary(work) + "\n")
            print(table(per_seed[seed]) + "\n", flush=True)
        if len(per_seed) > 1:
            print(f"mean over seeds {', '.join(map(str, args.seeds))}\n")
            print(mean_table(per_seed))


if __name__ == "__main__":
    main()

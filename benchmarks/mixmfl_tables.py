"""MDM-MixMFL on the `mixmfl` synthetic preset: the two tables of docs/strategies/mixmfl.md.

Runs whole federations with `fedseg.federation.single_machine.simulate` (6 sites, each holding a
different pair of T1/T1ce/T2/FLAIR) and prints:

1. per-site test Dice (mean over tumour core and oedema) of FedAvg with zero-filled missing
   sequences vs MDM-MixMFL (as the paper's Table 1), averaged over three training seeds
   (`--seed` and `--extra-seeds`);
2. the ablation: the full model vs without tailored updating, memory, triplet loss,
   classifier (as the paper's Table 3), averaged over the same seeds, and per seed;
3. oedema Dice of the site that lacks T2/FLAIR, with and without the memory.

    .venv/bin/python benchmarks/mixmfl_tables.py --out /tmp/mixmfl_bench [--rounds 12 --iterations 10]

Variants can run as parallel processes (`--only fedavg MDM-MixMFL`, `--only wo_memory`,
`--only seed1235` for every variant of an extra seed, `--only seed1235/wo_memory`, ...); a
final call without --only reuses the finished runs and prints the tables (`--report`: runs
nothing, tables from the finished runs, each a mean over the seeds that have all its rows).

Single-threaded torch (so timings do not depend on the core count), augmentation in-process.
Results and per-run folders are kept under --out; a rerun reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "fedavg (zero-fill)": ("fedavg", {"missing": "zero"}),
    "MDM-MixMFL": ("mixmfl", {}),
    "w/o tailored updating": ("mixmfl", {"tailored": "false"}),
    "w/o memory": ("mixmfl", {"memory": "false"}),
    "w/o triplet loss": ("mixmfl", {"triplet": "false"}),
    "w/o classifier": ("mixmfl", {"classifier": "false"}),
}
FOREGROUND = ("tumour_core", "oedema")
SITE_WITHOUT_T2_FLAIR = "site1"


def run_variant(sites: Path, run_dir: Path, strategy: str, params: dict[str, str], rounds: int, iterations: int, seed: int,
                finished_only: bool = False) -> dict | None:
    from fedseg.federation.single_machine import SimulationConfig, simulate

    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if finished_only:
        return None
    start = time.monotonic()
    result = simulate(SimulationConfig(sites, strategy, rounds, run_dir, iterations=iterations, overrides=dict(params),
                                       seed=seed, workers=0))
    per_site = {}
    for site, metrics in sorted(result.test_metrics.items()):
        dice = {label: metrics["mean"][label]["dice"] for label in FOREGROUND}
        per_site[site] = {"dice": dice, "mean": sum(dice.values()) / len(dice)}
    out = {"strategy": strategy, "params": params, "per_site": per_site, "seconds": time.monotonic() - start}
    done.write_text(json.dumps(out, indent=2))
    return out


def table(rows: dict[str, dict], sites: list[str], reference: str | None = None) -> str:
    head = "| Method | " + " | ".join(sites) + " | Average |\n|---|" + "---|" * (len(sites) + 1) + "\n"
    ref_avg = None if reference is None else _average(rows[reference], sites)
    lines = []
    for name, result in rows.items():
        cells = [f"{100 * result['per_site'][s]['mean']:.2f}" for s in sites]
        avg = _average(result, sites)
        delta = "" if ref_avg is None or name == reference else f" ({100 * (avg - ref_avg):+.2f})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * avg:.2f}{delta} |")
    return head + "\n".join(lines)


def _slug(name: str) -> str:
    """"w/o memory" -> "wo_memory", "fedavg (zero-fill)" -> "fedavg": the run's folder name."""
    return name.split(" (")[0].replace("/", "").replace(" ", "_")


def _average(result: dict, sites: list[str]) -> float:
    return sum(result["per_site"][s]["mean"] for s in sites) / len(sites)


TABLE1 = ("fedavg (zero-fill)", "MDM-MixMFL")


def seed_mean(runs: list[dict]) -> dict:
    """A result whose per-site Dice is the mean over several seeds' results."""
    sites = sorted(runs[0]["per_site"])
    per_site = {}
    for site in sites:
        dice = {label: sum(r["per_site"][site]["dice"][label] for r in runs) / len(runs) for label in FOREGROUND}
        per_site[site] = {"dice": dice, "mean": sum(dice.values()) / len(dice)}
    return {"per_site": per_site, "seconds": sum(r["seconds"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234, help="training seed of every variant (Tables 1 and 3)")
    parser.add_argument("--extra-seeds", type=int, nargs="*", default=[1235, 1236],
                        help="more training seeds of every variant, runs under --out/seed<N>/")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--patch", default="16,16,16", help="configuration.patch_size for every run (small: CPU time)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run just these variants (slugs, e.g. fedavg MDM-MixMFL wo_memory; seed<N> for every "
                             "variant of an extra seed, seed<N>/<slug> for one), then stop")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: print the tables from the finished runs (a mean over the seeds that have them)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedseg.synth import generate

    sites = args.out / "sites"
    if not (sites / "site6" / "dataset.json").is_file():
        generate(sites, preset="mixmfl", seed=args.data_seed)
    runs = collect_runs(args, sites)
    if args.only is None:
        print_tables(args, runs)


def _wanted(only: list[str] | None, seed: int, base_seed: int, slug: str) -> bool:
    if only is None:
        return True
    if seed == base_seed:
        return slug in only
    return f"seed{seed}" in only or f"seed{seed}/{slug}" in only


def collect_runs(args: argparse.Namespace, sites: Path) -> dict[int, dict[str, dict]]:
    """{seed: {variant: result}}: the runs `--only` asks for (all without it), run unless finished
    (with --report, only the finished ones)."""
    runs: dict[int, dict[str, dict]] = {}
    for seed in [args.seed, *args.extra_seeds]:
        runs[seed] = {}
        for name, (strategy, params) in VARIANTS.items():
            slug = _slug(name)
            if not _wanted(args.only, seed, args.seed, slug):
                continue
            run_dir = args.out / slug if seed == args.seed else args.out / f"seed{seed}" / slug
            result = run_variant(sites, run_dir, strategy, {**params, "configuration.patch_size": args.patch},
                                 args.rounds, args.iterations, seed, finished_only=args.report)
            if result is None:
                continue
            runs[seed][name] = result
            print(f"{name}, seed {seed}: {100 * _average(result, sorted(result['per_site'])):.2f} ({result['seconds']:.0f}s)",
                  flush=True)
    return runs


def print_tables(args: argparse.Namespace, runs: dict[int, dict[str, dict]]) -> None:
    """Table 1 and the ablation, each a mean over the seeds that have all of its rows."""
    site_names = sorted(runs[args.seed]["MDM-MixMFL"]["per_site"])

    def over_seeds(names: list[str]) -> tuple[list[int], dict[str, dict]]:
        seeds = [seed for seed, by_name in runs.items() if all(n in by_name for n in names)]
        return seeds, {n: seed_mean([runs[seed][n] for seed in seeds]) for n in names} if seeds else {}

    seeds1, table1 = over_seeds(list(TABLE1))
    print(f"\nTable 1: per-site test Dice (%, mean of tumour core and oedema), mean over seeds {', '.join(map(str, seeds1))}\n")
    print(table(table1, site_names))
    ablation_names = [n for n in VARIANTS if n != "fedavg (zero-fill)"]
    seeds3, ablation = over_seeds(ablation_names)
    print("\nper seed (average over sites): " + "; ".join(
        f"{seed}: " + ", ".join(f"{name} {100 * _average(result, site_names):.2f}" for name, result in by_name.items())
        for seed, by_name in runs.items() if by_name))
    if not seeds3:   # --report before any seed has every variant: Table 1 only
        print("\nTable 3: no seed has all of its rows yet")
    else:
        print(f"\nTable 3: ablation (%, mean of tumour core and oedema), mean over seeds {', '.join(map(str, seeds3))}\n")
        print(table(ablation, site_names, reference="MDM-MixMFL"))
        full = ablation["MDM-MixMFL"]["per_site"][SITE_WITHOUT_T2_FLAIR]["dice"]["oedema"]
        without = ablation["w/o memory"]["per_site"][SITE_WITHOUT_T2_FLAIR]["dice"]["oedema"]
        print(f"\n{SITE_WITHOUT_T2_FLAIR} (T1 + T1ce only) oedema Dice, seeds {', '.join(map(str, seeds3))}: "
              f"with memory {100 * full:.2f}, without {100 * without:.2f}")
    summary = {"rounds": args.rounds, "iterations": args.iterations, "runs": {str(k): v for k, v in runs.items()},
               "table1_seeds": seeds1, "table1_seed_mean": table1, "ablation_seeds": seeds3, "ablation_seed_mean": ablation}
    (args.out / "tables.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

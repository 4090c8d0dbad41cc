"""FLAMES on the synthetic `flames` preset: FedAvg baseline vs one model per modality.

Generates the preset (3 large MRI sites of the brain, 2 small ultrasound sites of the
breast and the ovary, and a mixed server test set), runs `fedseg simulate` with
`--strategy fedavg` and `--strategy flames` (same network, loss and schedule: the loss is
FLAMES' Dice + Focal for both, as in the paper's baseline), and prints two markdown tables:

- Table 3 (per site, each site's own test split): IoU, Dice and pixel accuracy of the
  lesion, FedAvg vs FLAMES;
- Table 4 (server side): each server model on the server test set, on the cases of its
  own modality (ultrasound: breast and ovary mixed) and on all cases.

It then checks the paper's finding: the ultrasound sites' Dice rises by at least 0.1 under
FLAMES while the MRI sites stay within 0.03 of FedAvg (exit code 1 when not).
The two simulations run side by side, one thread each; ~15 min on 2 cores (12 rounds).

Usage: python benchmarks/flames_tables.py [WORK_DIR] [--rounds R] [--iterations I] [--seed S]
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

MRI_TOLERANCE = 0.03
US_MIN_GAIN = 0.10
STRATEGIES = ("fedavg", "flames")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="?", type=Path, default=None, help="work folder (reused: finished runs are kept)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=25, help="local iterations per site per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedseg_flames_"))
    sites = work / "sites"
    fedseg = [sys.executable, "-m", "fedseg.cli.main"]
    start = time.monotonic()
    if not (sites / "_server_test" / "dataset.json").is_file():
        subprocess.run([*fedseg, "synth", str(sites), "--preset", "flames", "--seed", str(args.seed), "--quiet"], check=True)

    # One thread per simulation, both at once: the two runs share 2 cores without oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--rounds", str(args.rounds), "--iterations", str(args.iterations), "--workers", "0",
              "--set", "training.loss=dice_focal", "--set", f"configuration.batch_size={args.batch_size}",
              "--quiet", "--json"]
    procs = {}
    for strategy in STRATEGIES:
        out = work / f"run_{strategy}"
        log = open(work / f"{strategy}.log", "w")
        procs[strategy] = (subprocess.Popen([*fedseg, "simulate", str(sites), "--strategy", strategy, "-o", str(out), *common],
                                            env=env, stdout=subprocess.PIPE, stderr=log, text=True), log)
    results = {}
    for strategy, (proc, log) in procs.items():
        stdout, _ = proc.communicate()
        log.close()
        if proc.returncode != 0:
            print(f"{strategy} failed (exit {proc.returncode}); see {work / (strategy + '.log')}", file=sys.stderr)
            return 2
        results[strategy] = json.loads(stdout)
    elapsed = time.monotonic() - start

    modality = {site: json.loads((sites / site / "dataset.json").read_text())["channel_names"]["0"]
                for site in results["flames"]["test_metrics"]}
    print(table3(results, modality))
    print()
    server = json.loads((sites / "_server_test" / "dataset.json").read_text())
    organs_of: dict[str, set[str]] = {}
    for case, organ in server["case_organ"].items():
        organs_of.setdefault(server["case_modality"][case], set()).add(organ)
    print(table4(results, organs_of))
    print()
    ok, verdict = check(results, modality)
    print(verdict)
    print(f"\n{args.rounds} rounds x {args.iterations} iterations, batch {args.batch_size}, data seed {args.seed}; "
          f"{elapsed:.0f} s wall")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "elapsed_s": elapsed, "modality": modality,
               "per_site": {s: per_site(results[s]) for s in STRATEGIES},
               "server": {s: results[s]["server_metrics"] for s in STRATEGIES}, "finding_reproduced": ok}
    (work / "flames_tables.json").write_text(json.dumps(summary, indent=2))
    return 0 if ok else 1


def lesion(metrics: dict) -> dict:
    return metrics["foreground_mean"]


def per_site(result: dict) -> dict:
    return {site: lesion(m) for site, m in sorted(result["test_metrics"].items())}


def table3(results: dict, modality: dict) -> str:
    rows = ["| site | modality | FedAvg IoU | FedAvg Dice | FedAvg pixel acc. | FLAMES IoU | FLAMES Dice | FLAMES pixel acc. |",
            "|---|---|---|---|---|---|---|---|"]
    base, flames = per_site(results["fedavg"]), per_site(results["flames"])
    for site in sorted(base, key=lambda s: (modality[s] != "MRI", s)):
        b, f = base[site], flames[site]
        rows.append(f"| {site} | {modality[site]} | {b['iou']:.2f} | {b['dice']:.2f} | {100 * b['accuracy']:.2f}% "
                    f"| {f['iou']:.2f} | {f['dice']:.2f} | {100 * f['accuracy']:.2f}% |")
    return "\n".join(rows)


def table4(results: dict, organs_of: dict[str, set[str]]) -> str:
    rows = ["| strategy | server model | test cases | n | IoU | Dice | pixel acc. |", "|---|---|---|---|---|---|---|"]
    for strategy in STRATEGIES:
        models = results[strategy]["server_metrics"].get("models", {})
        for name, entry in sorted(models.items()):
            by_modality = entry.get("by_modality", {})
            organs = ", ".join(sorted(organs_of.get(name, ())))
            subsets = [(f"{name} ({organs})", by_modality[name])] if name in by_modality else []
            subsets.append(("all (mixed)", entry["all"]))
            for label, m in subsets:
                rows.append(f"| {strategy} | {name} | {label} | {m['n_cases']} | {_f(m['iou'])} | {_f(m['dice'])} "
                            f"| {_pct(m['accuracy'])} |")
    return "\n".join(rows)


def _f(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def check(results: dict, modality: dict) -> tuple[bool, str]:
    base, flames = per_site(results["fedavg"]), per_site(results["flames"])
    lines, ok = [], True
    for site in sorted(base):
        delta = flames[site]["dice"] - base[site]["dice"]
        if modality[site] == "MRI":
            good = abs(delta) <= MRI_TOLERANCE
            rule = f"|change| <= {MRI_TOLERANCE}"
        else:
            good = delta >= US_MIN_GAIN
            rule = f"gain >= {US_MIN_GAIN}"
        ok &= good
        lines.append(f"{site:10s} {modality[site]:4s} Dice {base[site]['dice']:.3f} -> {flames[site]['dice']:.3f} "
                     f"({delta:+.3f}; {rule}: {'yes' if good else 'NO'})")
    lines.append("finding reproduced" if ok else "finding NOT reproduced")
    return ok, "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

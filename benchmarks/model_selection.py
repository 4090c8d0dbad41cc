"""Five-fold ensemble vs single fold on the sites' test cases, after federated model selection.

Runs scripts/model_selection_example.sh on the `tiny` preset (3 sites, 8 training and 4 test
cases each): for 3d_fullres and 2d one federation per fold (5 folds), `fedseg validate` at
each site, `fedseg find-best` at the coordinator, prediction with the inference plan. Then
every site predicts its test cases with each single fold's model and with the five folds'
ensemble of each configuration, and the Dice of each is printed (mean over the 12 test
cases of all sites, and per site).

    nice .venv/bin/python benchmarks/model_selection.py [WORK] [--rounds R] [--iterations I]

About 6 minutes on 2 loaded cores with the defaults (2 rounds of 8 iterations).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGURATIONS = ("3d_fullres", "2d")
FOLDS = range(5)


def fedseg(*args: str) -> None:
    subprocess.run(["fedseg", *args, "--quiet"], check=True)


def test_dice(work: Path, sites: Path, name: str, site: str, model_args: list[str]) -> dict:
    """Predict `site`'s test cases with the models given; its per-case Dice as evaluate writes it."""
    out = work / "bench" / name / site
    if not (out.parent / f"{site}.json").is_file():
        fedseg("predict", *model_args, "--site", site, "-i", str(sites / site / "imagesTs"), "-o", str(out))
        fedseg("evaluate", "--pred", str(out), "--ref", str(sites / site / "labelsTs"), "-o", str(out.parent / f"{site}.json"))
    return json.loads((out.parent / f"{site}.json").read_text())


def case_dice(metrics: dict) -> list[float]:
    return [case["metrics"]["lesion"]["dice"] for case in metrics["per_case"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=8)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedseg_model_selection_"))
    sites = work / "sites"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    load_before = load_average()
    start = time.monotonic()
    if not (work / "selection" / "inference_plan.json").is_file():
        if sites.exists():
            shutil.rmtree(sites)
        fedseg("synth", str(sites), "--preset", "tiny", "--seed", "0")
        subprocess.run(["bash", str(REPO / "scripts" / "model_selection_example.sh"), str(sites), str(work),
                        str(args.rounds), str(args.iterations)], check=True, stdout=subprocess.DEVNULL)
    flow_s = time.monotonic() - start
    site_names = sorted(p.name for p in sites.iterdir() if (p / "dataset.json").is_file())
    rows: dict[str, dict[str, list[float]]] = {}
    for config in CONFIGURATIONS:
        runs = work / "runs" / config
        for fold in FOLDS:
            rows[f"{config} fold {fold}"] = {
                s: case_dice(test_dice(work, sites, f"{config}_fold{fold}", s, ["--run", str(runs / f"fold_{fold}")]))
                for s in site_names
            }
        ensemble = [a for fold in FOLDS for a in ("--run", str(runs / f"fold_{fold}"))]
        rows[f"{config} 5-fold ensemble"] = {
            s: case_dice(test_dice(work, sites, f"{config}_ensemble", s, ensemble)) for s in site_names
        }
    plan = json.loads((work / "selection" / "inference_plan.json").read_text())
    rows[f"inference plan: {plan['chosen']}"] = {
        s: case_dice(json.loads((work / "predictions" / f"{s}.metrics.json").read_text())) for s in site_names
    }
    print(f"machine: {os.cpu_count()} CPU cores; load {load_before} -> {load_average()}; "
          f"flow {flow_s:.0f} s ({args.rounds} rounds x {args.iterations} iterations per fold and configuration)")
    print(f"find-best chose {plan['chosen']}, keep largest foreground component: {plan['postprocessing']['largest_foreground']}")
    print("cross-validation Dice: " + ", ".join(f"{n} {c['foreground_mean_dice']:.4f}" for n, c in plan["candidates"].items()))
    print()
    print("| models | test Dice (12 cases) | " + " | ".join(site_names) + " |")
    print("|---|---|" + "---|" * len(site_names))
    for name, per_site in rows.items():
        pooled = [d for s in site_names for d in per_site[s]]
        cells = " | ".join(f"{sum(per_site[s]) / len(per_site[s]):.4f}" for s in site_names)
        print(f"| {name} | {sum(pooled) / len(pooled):.4f} | {cells} |")
    for config in CONFIGURATIONS:
        singles = [d for fold in FOLDS for s in site_names for d in rows[f"{config} fold {fold}"][s]]
        print(f"{config}: mean of the single folds {sum(singles) / len(singles):.4f}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()

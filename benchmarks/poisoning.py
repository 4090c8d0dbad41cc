"""Model poisoning on the `tiny5` preset: one of five sites sends its update scaled by -10.

Arms (each a full federation from the same seed; only the plan's aggregation rule and the
attacker differ):
  fedavg, clean          the reference
  fedavg, attacked       the weighted mean takes the poisoned update at face value
  median, attacked       --set robust=median
  trimmed:0.2, attacked  --set robust=trimmed:0.2 (drops the lowest and highest of 5 values)
  (--clean-robust adds the two robust rules without attacker, to show what they cost)

The attacker trains honestly, then rewrites its update file before `aggregate` with every
tensor multiplied by --scale and a valid content hash (as a malicious site can: the hash is
integrity, not trust). Test Dice = mean foreground Dice over the five sites' test sets, each
site predicting with the model it loads after the last round.

    nice .venv/bin/python benchmarks/poisoning.py --work /tmp/poisoning
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def attack(path: Path, scale: float) -> None:
    from fedseg.federation.weightfile import read_weight_file, write_weight_file

    tensors, meta = read_weight_file(path)
    write_weight_file(path, {k: (v * scale).astype(v.dtype) for k, v in tensors.items()}, meta)


def run_arm(name: str, params: dict, attacker: str | None, args, sites: dict[str, Path], fingerprints: list) -> dict:
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.round_zero import initial_round
    from fedseg.federation.plan_building import attach_manifests
    from fedseg.federation.site_training import load_site_model, run_site_round
    from fedseg.federation.strategies import get_strategy
    from fedseg.planning.planner import make_plans
    from fedseg.training.evaluation import evaluate_folders
    from fedseg.training.inference import predict_folder

    work = args.work / name.replace(", ", "_").replace(":", "")
    overrides = {"training.rounds": str(args.rounds), "training.iterations_per_round": str(args.iterations), **params}
    plans = attach_manifests(
        make_plans(fingerprints, strategy="fedavg", overrides=overrides, seed=args.seed), get_strategy("fedavg")
    )
    # An arm folder of the same plan and attack is continued (complete rounds are kept), so an
    # interrupted benchmark does not start over; anything else is replaced.
    tag = {"plan_id": plans.plan_id, "attacker": attacker, "scale": args.scale}
    tag_file = work / "arm.json"
    if work.exists() and not (tag_file.is_file() and json.loads(tag_file.read_text()) == tag):
        shutil.rmtree(work)
    if not tag_file.is_file():
        initial_round(plans, work / "round_000")
        work.mkdir(parents=True, exist_ok=True)
        tag_file.write_text(json.dumps(tag))
    for r in range(1, args.rounds + 1):
        rdir = work / f"round_{r:03d}"
        if (rdir / "aggregate.json").is_file():
            continue
        updates = []
        for site, data in sites.items():
            update = rdir / "updates" / f"{site}.safetensors"
            run_site_round(plans, site, data, work / f"round_{r - 1:03d}" / f"{site}.safetensors", work / "state" / site,
                           update, num_workers=0)
            if site == attacker:
                attack(update, args.scale)
            updates.append(update)
        aggregate_round(plans, updates, rdir)
    report = json.loads((work / f"round_{args.rounds:03d}" / "aggregate.json").read_text())
    dice = {}
    final = work / f"round_{args.rounds:03d}"
    for site, data in sites.items():
        network = load_site_model(plans, site, final / f"{site}.safetensors", work / "state" / site)
        out = work / "pred" / site
        predict_folder(network, data / "imagesTs", out, plans, plans.configuration_for(site))
        result = evaluate_folders(out, data / "labelsTs", plans.labels, plans.file_ending)
        dice[site] = result["foreground_mean"]["dice"]
    norms = {i["site"]: i["update_norm"] for i in report["inputs"]}
    return {"arm": name, "dice": dice, "mean_dice": sum(dice.values()) / len(dice), "last_update_norms": norms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedseg_poisoning"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=12, help="local iterations per round")
    parser.add_argument("--scale", type=float, default=-10.0)
    parser.add_argument("--attacker", default="site_e")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--clean-robust", action="store_true", help="also run median and trimmed mean without attacker")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)   # the experiment must fit a shared 2-core machine
    from fedseg.data.dataset import load_dataset
    from fedseg.synth import generate
    from fedseg.planning.fingerprint import compute_fingerprint

    start = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    sites_root = args.work / "sites"
    if not (sites_root / "site_e" / "dataset.json").is_file():
        generate(sites_root, preset="tiny5", seed=0)
    sites = {p.name: p for p in sorted(sites_root.iterdir()) if (p / "dataset.json").is_file()}
    fingerprints = [compute_fingerprint(load_dataset(p), name) for name, p in sites.items()]

    arms = [("fedavg, clean", {}, None), ("fedavg, attacked", {}, args.attacker),
            ("median, attacked", {"robust": "median"}, args.attacker),
            ("trimmed:0.2, attacked", {"robust": "trimmed:0.2"}, args.attacker)]
    if args.clean_robust:
        arms += [("median, clean", {"robust": "median"}, None), ("trimmed:0.2, clean", {"robust": "trimmed:0.2"}, None)]
    results = []
    for name, params, attacker in arms:
        t0 = time.monotonic()
        results.append(run_arm(name, params, attacker, args, sites, fingerprints))
        print(f"{name}: mean test Dice {results[-1]['mean_dice']:.3f} ({time.monotonic() - t0:.0f}s)", flush=True)

    clean = results[0]["mean_dice"]
    print()
    print(f"tiny5, {args.rounds} rounds x {args.iterations} iterations, attacker {args.attacker} sends update x {args.scale:g}")
    print("| aggregation | attacker | mean test Dice | vs clean fedavg | per site |")
    print("|---|---|---|---|---|")
    for (name, _params, attacker), res in zip(arms, results):
        rule = name.split(",")[0]
        per_site = " ".join(f"{d:.2f}" for d in res["dice"].values())
        print(f"| {rule} | {'x' + format(args.scale, 'g') if attacker else 'none'} | {res['mean_dice']:.3f} | "
              f"{res['mean_dice'] - clean:+.3f} | {per_site} |")
    print(f"\ntotal {time.monotonic() - start:.0f}s")
    (args.work / "poisoning.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Cost of a round as the number of sites grows: `fedseg simulate` with 3, 6, 12, 24 tiny sites.

The sites are copies of the `tiny5` preset's five sites (hard links, renamed `site_00`...),
so every site has the same amount of data and work: a round trains every site in turn and
then aggregates, so its wall time should grow linearly with the number of sites, while the
coordinator's memory (the `aggregate` step) should not grow with them (it streams key by key
over memory-mapped updates).

For each N: `fedseg simulate SITES --rounds 2 --iterations I --workers 0` (one process;
round 2's wall time is taken from the round folders' commit records, `aggregate.json`, so
preprocessing, which round 1 pays, is left out) and the CPU time of the whole command (both
rounds, preprocessing and the final evaluation: every part of it is per site, and CPU time
is far less disturbed than wall time when other jobs share the cores), then the coordinator alone: `fedseg
aggregate` of round 2's N updates into a fresh folder, as a subprocess with its peak resident
and anonymous memory. Prints a table, fits time = a + b·N (wall of round 2, and CPU of the
whole run) and writes a plot.

    nice .venv/bin/python benchmarks/sites_scale.py --work /tmp/fedseg_sites_scale [--sites 3,6,12,24]

About 10 minutes on 2 loaded cores; the work folder can be deleted afterwards.

With `--engine flower`, the same sites go through `fedseg flower simulate` (Flower's
Simulation Runtime: the coordinator in this process, the sites in Ray worker processes, one
site at a time with `--parallel 1 --cpus-per-site 1`). Every process of the tree is counted:
the peak of the tree's summed resident and anonymous memory, the peak of the coordinator's
own process, the kernel's peak RSS (VmHWM) of the coordinator and of the largest process (the
Ray actor that trains the sites), the most processes alive at once and the CPU time of all of
them (read from /proc, since Ray's processes are not all waited for). Each run is checked: round 2's
aggregate.json and N updates exist, and the sites' mean validation Dice rises from round 1 to
round 2 (printed beside the plain `simulate` run's when run_N/ is in the work folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Measured, load_average, run_measured  # noqa: E402


def make_sites(base: Path, target: Path, n: int) -> None:
    """`n` site folders under `target`, each a hard-linked copy of one of the base sites."""
    if target.is_dir():
        return
    sources = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("_"))
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for i in range(n):
        shutil.copytree(sources[i % len(sources)], staging / f"site_{i:02d}", copy_function=os.link)
    staging.rename(target)


def round_seconds(run: Path, r: int) -> float:
    """Wall time of round r: from round r-1's commit record to round r's."""
    before = run / f"round_{r - 1:03d}" / ("init.json" if r == 1 else "aggregate.json")
    return (run / f"round_{r:03d}" / "aggregate.json").stat().st_mtime - before.stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedseg_sites_scale"))
    parser.add_argument("--sites", default="3,6,12,24")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--engine", choices=("simulate", "flower"), default="simulate",
                        help="fedseg simulate (default) or fedseg flower simulate")
    args = parser.parse_args()
    counts = [int(n) for n in args.sites.split(",")]
    cli = str(Path(sys.executable).with_name("fedseg"))
    base = args.work / "tiny5"
    if not base.is_dir():
        run_measured([cli, "synth", str(base), "--preset", "tiny5", "--seed", "0", "--quiet"])
    print(f"load before: {load_average()}")
    if args.engine == "flower":
        flower_main(args, cli, counts, base)
        return
    rows: list[tuple[int, float, Measured, Measured]] = []
    for n in counts:
        sites, run, out = args.work / f"sites_{n}", args.work / f"run_{n}", args.work / f"aggregate_{n}"
        make_sites(base, sites, n)
        shutil.rmtree(run, ignore_errors=True)
        whole = run_measured([cli, "simulate", str(sites), "--rounds", "2", "--iterations", str(args.iterations),
                              "--workers", "0", "--device", "cpu", "-o", str(run), "--quiet"], timeout=3600)
        updates = sorted(str(p) for p in (run / "round_002" / "updates").glob("*.safetensors"))
        shutil.rmtree(out, ignore_errors=True)
        coordinator = run_measured([cli, "aggregate", "--plans", str(run / "plans.json"), *updates, "-o", str(out), "--quiet"])
        rows.append((n, round_seconds(run, 2), whole, coordinator))
        print(f"  {n} sites done (load {load_average()})", flush=True)

    print(f"{'sites':>5} {'round 2 s':>10} {'s/site':>7} {'simulate s':>11} {'CPU s':>7} {'CPU s/site':>11} {'simulate peak RSS MB':>21} "
          f"{'aggregate s':>12} {'aggregate peak RSS MB':>22} {'aggregate peak anon MB':>23}")
    for n, seconds, whole, coordinator in rows:
        print(f"{n:>5} {seconds:>10.1f} {seconds / n:>7.2f} {whole.seconds:>11.1f} {whole.cpu_seconds:>7.1f} "
              f"{whole.cpu_seconds / n:>11.2f} {whole.peak_rss_mb:>21.0f} "
              f"{coordinator.seconds:>12.2f} {coordinator.peak_rss_mb:>22.0f} {coordinator.peak_anon_mb:>23.0f}")
    n_arr = np.array([r[0] for r in rows], dtype=float)
    wall = _fit(n_arr, np.array([r[1] for r in rows]))
    cpu = _fit(n_arr, np.array([r[2].cpu_seconds for r in rows]))
    anon = [r[3].peak_anon_mb for r in rows]
    plot = args.work / "sites_scale.png"
    _plot(n_arr, wall, cpu, {"aggregate": anon}, plot, "aggregate peak anon memory (MB)")
    print(f"load after: {load_average()}; plot {plot}")
    print(f"ratio: round 2 wall = {wall[1]:.1f} s + {wall[2]:.2f} s x sites (R^2 {wall[3]:.3f}); whole run CPU = "
          f"{cpu[1]:.1f} s + {cpu[2]:.2f} s x sites (R^2 {cpu[3]:.3f}); coordinator peak anonymous "
          f"memory {min(anon):.0f}-{max(anon):.0f} MB from {counts[0]} to {counts[-1]} sites")


def flower_main(args: argparse.Namespace, cli: str, counts: list[int], base: Path) -> None:
    """`fedseg flower simulate` on each number of sites: table, fits, and the points in a JSON file."""
    rows: list[tuple[int, float, Measured, tuple[float, float], tuple[float, float] | None]] = []
    for n in counts:
        sites, run = args.work / f"sites_{n}", args.work / f"flower_{n}"
        make_sites(base, sites, n)
        shutil.rmtree(run, ignore_errors=True)
        # 10 samples a second: a Ray tree has a few hundred threads to walk, and the samples
        # must not take a core from the run on a 2-core machine
        whole = run_measured([cli, "flower", "simulate", str(sites), "--rounds", "2", "--iterations", str(args.iterations),
                              "--workers", "0", "--device", "cpu", "--parallel", "1", "--cpus-per-site", "1",
                              "-o", str(run), "--quiet"], interval=0.1, timeout=3600, tree_cpu=True)
        dice = check_run(run, n)
        plain = mean_val_dice(args.work / f"run_{n}") if (args.work / f"run_{n}" / "report").is_dir() else None
        rows.append((n, round_seconds(run, 2), whole, dice, plain))
        print(f"  {n} sites done (load {load_average()})", flush=True)
    print(f"{'sites':>5} {'round 2 s':>10} {'s/site':>7} {'run s':>7} {'CPU s':>7} {'CPU s/site':>11} {'procs':>6} "
          f"{'tree RSS MB':>12} {'tree anon MB':>13} {'coord anon MB':>14} {'coord HWM MB':>13} {'largest HWM MB':>15} "
          f"{'val Dice r1 -> r2':>18} {'plain simulate':>15}")
    for n, seconds, m, dice, plain in rows:
        plain_text = "-" if plain is None else f"{plain[0]:.3f} -> {plain[1]:.3f}"
        print(f"{n:>5} {seconds:>10.1f} {seconds / n:>7.2f} {m.seconds:>7.1f} {m.tree_cpu_seconds:>7.1f} "
              f"{m.tree_cpu_seconds / n:>11.2f} {m.peak_processes:>6} {m.peak_rss_mb:>12.0f} {m.peak_anon_mb:>13.0f} "
              f"{m.root_peak_anon_mb:>14.0f} {m.root_hwm_mb:>13.0f} {m.largest_hwm_mb:>15.0f} "
              f"{f'{dice[0]:.3f} -> {dice[1]:.3f}':>18} {plain_text:>15}")
    n_arr = np.array([r[0] for r in rows], dtype=float)
    cpu = _fit(n_arr, np.array([r[2].tree_cpu_seconds for r in rows]))
    tree = _fit(n_arr, np.array([r[2].peak_anon_mb for r in rows]))
    root = _fit(n_arr, np.array([r[2].root_hwm_mb for r in rows]))
    largest = _fit(n_arr, np.array([r[2].largest_hwm_mb for r in rows]))
    print(f"load after: {load_average()}")
    print(f"ratio: whole run CPU = {cpu[1]:.1f} s + {cpu[2]:.2f} s x sites (R^2 {cpu[3]:.3f}); per site, peak memory grows by: "
          f"tree anonymous (sampled) {tree[2]:.2f} MB, coordinator VmHWM {root[2]:.2f} MB, largest process VmHWM {largest[2]:.2f} MB")
    points = {"sites": counts, "round2_s": [r[1] for r in rows], "cpu_s": [r[2].tree_cpu_seconds for r in rows],
              "tree_peak_anon_mb": list(tree[0]), "coordinator_hwm_mb": list(root[0]), "largest_hwm_mb": list(largest[0])}
    (args.work / "sites_scale_flower.json").write_text(json.dumps(points, indent=1))
    plot = args.work / "sites_scale_flower.png"
    wall = _fit(n_arr, np.array([r[1] for r in rows]))
    _plot(n_arr, wall, cpu, {"whole tree, anon (sampled)": tree[0], "coordinator, VmHWM": root[0],
                             "largest process (training), VmHWM": largest[0]}, plot, "peak memory (MB)")
    print(f"plot {plot}")


def check_run(run: Path, n: int) -> tuple[float, float]:
    """Fail unless round 2 was aggregated from all `n` updates and the model learned; the
    sites' mean validation Dice of rounds 1 and 2."""
    updates = list((run / "round_002" / "updates").glob("*.safetensors"))
    if not (run / "round_002" / "aggregate.json").is_file() or len(updates) != n:
        raise RuntimeError(f"{run}: round 2 has no aggregate.json or {len(updates)} updates instead of {n}")
    dice = mean_val_dice(run)
    if not dice[1] > dice[0]:
        raise RuntimeError(f"{run}: mean validation Dice did not rise from round 1 to round 2 ({dice})")
    return dice


def mean_val_dice(run: Path) -> tuple[float, float]:
    """The sites' mean validation Dice in rounds 1 and 2 (report/metrics.json)."""
    per_site = json.loads((run / "report" / "metrics.json").read_text())["val_dice_per_round"]
    r1, r2 = zip(*(values[:2] for values in per_site.values()))
    return float(np.mean(r1)), float(np.mean(r2))


def _fit(n: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """(values, intercept, slope, R²) of the least-squares line y = a + b·n."""
    slope, intercept = np.polyfit(n, y, 1)
    fitted = intercept + slope * n
    r2 = 1 - float(np.sum((y - fitted) ** 2) / np.sum((y - y.mean()) ** 2))
    return y, float(intercept), float(slope), r2


def _plot(n: np.ndarray, wall: tuple, cpu: tuple, memory: dict[str, list[float] | np.ndarray], path: Path,
          ylabel: str) -> None:
    """Seconds against sites (points and fitted lines) beside peak memory (one line per entry of `memory`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for (values, intercept, slope, _r2), label in ((wall, "round 2 wall"), (cpu, "whole run CPU")):
        left.plot(n, values, "o", label=label)
        left.plot(n, intercept + slope * n, "-", color=left.lines[-1].get_color())
    left.set_xlabel("sites")
    left.set_ylabel("seconds")
    left.legend()
    for label, values in memory.items():
        right.plot(n, values, "o-", label=label)
    right.set_xlabel("sites")
    right.set_ylabel(ylabel)
    if len(memory) > 1:
        right.legend(fontsize="small")
    right.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()

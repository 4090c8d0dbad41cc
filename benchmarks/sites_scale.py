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
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    counts = [int(n) for n in args.sites.split(",")]
    cli = str(Path(sys.executable).with_name("fedseg"))
    base = args.work / "tiny5"
    if not base.is_dir():
        run_measured([cli, "synth", str(base), "--preset", "tiny5", "--seed", "0", "--quiet"])
    print(f"load before: {load_average()}")
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
    _plot(n_arr, wall, cpu, anon, plot)
    print(f"load after: {load_average()}; plot {plot}")
    print(f"ratio: round 2 wall = {wall[1]:.1f} s + {wall[2]:.2f} s x sites (R^2 {wall[3]:.3f}); whole run CPU = "
          f"{cpu[1]:.1f} s + {cpu[2]:.2f} s x sites (R^2 {cpu[3]:.3f}); coordinator peak anonymous "
          f"memory {min(anon):.0f}-{max(anon):.0f} MB from {counts[0]} to {counts[-1]} sites")


def _fit(n: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """(values, intercept, slope, R²) of the least-squares line y = a + b·n."""
    slope, intercept = np.polyfit(n, y, 1)
    fitted = intercept + slope * n
    r2 = 1 - float(np.sum((y - fitted) ** 2) / np.sum((y - y.mean()) ** 2))
    return y, float(intercept), float(slope), r2


def _plot(n: np.ndarray, wall: tuple, cpu: tuple, anon: list[float], path: Path) -> None:
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
    right.plot(n, anon, "o-")
    right.set_xlabel("sites")
    right.set_ylabel("aggregate peak anon memory (MB)")
    right.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()

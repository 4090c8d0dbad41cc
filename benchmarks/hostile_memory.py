"""Peak memory against hostile inputs: a stowaway tensor, and clip_norm over many sites.

1. **Stowaway tensor.** The `tiny` preset's planned network (5.4 MB of float32) is written
   by `fedseg init`; its model file then gets one more header entry declaring a 1.5 GiB
   float32 tensor, stored as a sparse hole (the file takes 5 MB on disk). `fedseg predict`
   and `fedseg train` are run on it; both must refuse it (exit 2) and stay under 1 GB.
   `fedseg inspect` (no plan to check against) hashes all 1.5 GiB, streamed from the map.
2. **clip_norm.** `fedseg aggregate` of one round of the same network with `clip_norm`
   (every site's delta clipped) at 10 and 50 sites; the non-file memory must grow by less
   than one model between the two.

Each command runs as a subprocess of a small wrapper that reports
`getrusage(RUSAGE_CHILDREN).ru_maxrss`: the kernel's exact peak resident memory of the
command (it includes memory-mapped file pages). Non-file memory is RssAnon (resident memory
minus file-backed pages: what the process allocated, not the page cache its mappings
show), polled every 5 ms over the process tree by `measure.py`; for clip_norm it is also
measured in-process with `tracemalloc` (numpy's allocations, exact, polling-free).

    nice .venv/bin/python benchmarks/hostile_memory.py [--work DIR] [--tree DIR]

`--tree` runs the commands with another checkout's `fedseg` package (PYTHONPATH), e.g. the
code before the limits, for a before/after comparison. The parent process imports neither
fedseg nor numpy, so the child's ru_maxrss is its own (a forked child starts from its
parent's peak). About a minute on 2 loaded cores; WORK (default /tmp/fedseg_hostile_memory)
holds ~300 MB of update files at 50 sites and is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import load_average, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STOWAWAY_BYTES = 3 << 29            # 1.5 GiB
CLIP_SITES = (10, 50)
_CLI = "import sys; from fedseg.cli.main import run; sys.exit(run(sys.argv[1:]))"
# reports the child's own peak (KiB) on its last stderr line
_MAXRSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('ru_maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def fedseg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-P", "-c", _CLI, *args]   # -P: fedseg from PYTHONPATH, not the cwd


def measured(cmd: list[str], env: dict) -> dict:
    m = run_measured([sys.executable, "-c", _MAXRSS, *cmd], env=env, check=False)
    lines = m.stderr.strip().splitlines()
    maxrss = int(lines[-1].split()[1]) / 1024
    message = next((line for line in reversed(lines[:-1]) if line.strip()), "")
    return {"rc": m.returncode, "seconds": m.seconds, "ru_maxrss_mb": maxrss, "peak_anon_mb": m.peak_anon_mb,
            "message": message}


def run_ok(cmd: list[str], env: dict) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} exited {done.returncode}: {done.stderr[-2000:]}")


# ---------------------------------------------------------------------------------------
# 1. stowaway tensor
# ---------------------------------------------------------------------------------------
def add_stowaway(path: Path, n_bytes: int) -> None:
    """Declare one more float32 tensor of n_bytes at the end of a safetensors file (a sparse hole)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    header["stowaway"] = {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [len(data), len(data) + n_bytes]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + data)
        handle.truncate(8 + len(text) + len(data) + n_bytes)


def federation(work: Path, env: dict) -> tuple[Path, Path, Path]:
    """(plans.json, round_000, site_a's data folder) of the `tiny` preset, made once under WORK."""
    plans = work / "plans.json"
    if not plans.is_file():
        run_ok(fedseg_cmd("synth", str(work / "sites"), "--preset", "tiny", "-q"), env)
        fps = []
        for site in sorted(p for p in (work / "sites").iterdir() if p.is_dir()):
            fps.append(str(work / "fp" / f"{site.name}.json"))
            run_ok(fedseg_cmd("fingerprint", "--site", site.name, "--data", str(site), "-o", fps[-1], "-q"), env)
        run_ok(fedseg_cmd("plan", *fps, "-o", str(plans), "-q"), env)
        run_ok(fedseg_cmd("init", "--plans", str(plans), "-o", str(work / "round_000"), "-q"), env)
    return plans, work / "round_000", work / "sites" / "site_a"


def stowaway(work: Path, env: dict) -> list[tuple[str, dict]]:
    plans, round0, data = federation(work, env)
    model = round0 / "site_a.safetensors"
    hostile = work / "hostile_site_a.safetensors"
    shutil.copyfile(model, hostile)
    add_stowaway(hostile, STOWAWAY_BYTES)
    shutil.rmtree(work / "pred", ignore_errors=True)
    shutil.rmtree(work / "state", ignore_errors=True)
    rows = [
        ("predict", measured(fedseg_cmd(
            "predict", "--plans", str(plans), "--weights", str(hostile), "-i", str(data / "imagesTs"),
            "-o", str(work / "pred"), "--site", "site_a", "-q"), env)),
        ("train", measured(fedseg_cmd(
            "train", "--site", "site_a", "--data", str(data), "--plans", str(plans), "--weights", str(hostile),
            "--state", str(work / "state"), "-o", str(work / "upd" / "site_a.safetensors"), "--iterations", "1",
            "-q"), env)),
        ("inspect", measured(fedseg_cmd("inspect", str(hostile)), env)),
    ]
    print(f"model file: {model.stat().st_size / 1e6:.1f} MB; hostile copy declares +{STOWAWAY_BYTES / 2**30:.1f} GiB "
          f"({hostile.stat().st_size / 2**30:.2f} GiB apparent, {os.stat(hostile).st_blocks * 512 / 1e6:.1f} MB on disk)")
    return rows


# ---------------------------------------------------------------------------------------
# 2. clip_norm over many sites (set up and traced in subprocesses that import fedseg)
# ---------------------------------------------------------------------------------------
def make_clip_round(plans_path: str, round0_model: str, folder: str, n_sites: str) -> None:
    """A plan of n_sites copies of the tiny configuration with clip_norm, the round-0 model
    of every site (hard links to one file, as fedavg's round folders are) and one update per
    site whose delta is longer than clip_norm."""
    import dataclasses

    import numpy as np

    from fedseg.federation.site_update import write_site_update
    from fedseg.federation.weightfile import WeightMeta, read_weight_file, write_weight_file
    from fedseg.planning.plans import StrategySpec, load_plans

    base = load_plans(plans_path)
    template = next(iter(base.sites.values()))
    sites = {f"site_{i:02d}": dataclasses.replace(template, n_cases=10 + i) for i in range(int(n_sites))}
    plans = dataclasses.replace(base, sites=sites, strategy=StrategySpec("fedavg", {"clip_norm": 1.0}))
    out = Path(folder)
    plans.save(out / "plans.json")
    tensors, meta = read_weight_file(round0_model)
    first = out / "round_000" / "start.safetensors"
    fields = {k: v for k, v in meta.__dict__.items() if k != "content_hash"}
    write_weight_file(first, tensors, WeightMeta(**{**fields, "plan_id": plans.plan_id, "site": "global"}))
    for i, site in enumerate(sorted(sites)):
        os.link(first, out / "round_000" / f"{site}.safetensors")
        rng = np.random.default_rng(i)
        state = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v) for k, v in tensors.items()}
        write_site_update(plans, site, state, out / "updates" / f"{site}.safetensors", round_index=1, n_iterations=5)


def traced_clip_round(folder: str) -> None:
    """aggregate_round under tracemalloc: prints the peak of numpy/Python allocations (MB)."""
    import tracemalloc

    from fedseg.federation.aggregation import aggregate_round
    from fedseg.planning.plans import load_plans

    out = Path(folder)
    plans = load_plans(out / "plans.json")
    updates = sorted((out / "updates").iterdir())
    tracemalloc.start()
    report = aggregate_round(plans, updates, out / "traced" / "round_001", previous_dir=out / "round_000")
    peak = tracemalloc.get_traced_memory()[1]
    clipped = sum(1 for record in report.inputs if record.clip_factor < 1.0)
    print(f"{peak / 1e6:.1f} {clipped}")


def clip(work: Path, env: dict) -> list[tuple[str, dict]]:
    plans, round0, _data = federation(work, env)
    rows = []
    for n in CLIP_SITES:
        folder = work / f"clip_{n}"
        shutil.rmtree(folder, ignore_errors=True)
        run_ok([sys.executable, __file__, "_make_clip", str(plans), str(round0 / "site_a.safetensors"), str(folder), str(n)], env)
        updates = sorted(str(p) for p in (folder / "updates").iterdir())
        row = measured(fedseg_cmd("aggregate", "--plans", str(folder / "plans.json"), *updates,
                                  "-o", str(folder / "round_001"), "-q"), env)
        traced = subprocess.run([sys.executable, __file__, "_traced_clip", str(folder)], env=env,
                                capture_output=True, text=True, check=True).stdout.split()
        row["traced_mb"], row["clipped"] = float(traced[0]), int(traced[1])
        rows.append((f"aggregate clip_norm, {n} sites", row))
        shutil.rmtree(folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedseg_hostile_memory"))
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose fedseg package runs the commands")
    parser.add_argument("--keep", action="store_true", help="keep WORK (the tiny federation is reused)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve()), "OMP_NUM_THREADS": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"fedseg from {args.tree.resolve()}; load at start: {load_average()}")
    rows = stowaway(args.work, env) + clip(args.work, env)
    print(f"{'command':34} {'exit':>4} {'wall s':>7} {'ru_maxrss MB':>13} {'peak anon MB':>13} {'traced MB':>10}")
    for name, r in rows:
        traced = f"{r['traced_mb']:.1f}" if "traced_mb" in r else "-"
        print(f"{name:34} {r['rc']:>4} {r['seconds']:>7.2f} {r['ru_maxrss_mb']:>13.0f} {r['peak_anon_mb']:>13.0f} {traced:>10}")
    for name, r in rows:
        if r["rc"] != 0:
            print(f"{name}: {r['message'][:200]}")
    model_mb = (args.work / "round_000" / "site_a.safetensors").stat().st_size / 1e6
    few, many = rows[-2][1], rows[-1][1]
    print(f"clip_norm {CLIP_SITES[0]} -> {CLIP_SITES[1]} sites: peak anon {many['peak_anon_mb'] - few['peak_anon_mb']:+.1f} MB, "
          f"traced {many['traced_mb'] - few['traced_mb']:+.1f} MB (one model: {model_mb:.1f} MB); "
          f"clipped sites {few['clipped']}, {many['clipped']}")
    worst = max(r["ru_maxrss_mb"] for name, r in rows[:3])
    print(f"stowaway: worst ru_maxrss {worst:.0f} MB (target < 1000); load at end: {load_average()}")
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_make_clip":
        make_clip_round(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_traced_clip":
        traced_clip_round(*sys.argv[2:])
    else:
        main()

"""Training speed on CPU: `fedseg train` vs nnU-Net's nnUNetTrainer, same network, patch and batch.

Set-up (nnunet_peer.py): 10 cases of ~64³ voxels, 2 channels, planned by both tools (the
same 3d_fullres patch, batch size, spacing and 5-stage PlainConvUNet, checked), preprocessed
by each tool its own way (nnUNetv2_plan_and_preprocess; fedseg's cache on its first run).

What is compared, iteration by iteration over the same number of iterations:

- **nnU-Net**: `nnUNetTrainer` for fold 0 built as `nnUNetv2_train` builds it
  (`get_trainer_from_args`, `on_train_start`: its data loader with 2 augmentation processes,
  `nnUNet_n_proc_DA=2`), then `next(trainer.dataloader_train)` and `trainer.train_step(batch)`
  (forward, deep-supervision loss, backward, gradient clipping, SGD step), timed separately.
  Nothing else (no validation, no checkpoints) — an nnU-Net epoch is 250 such iterations.
- **fedseg**: `fedseg train --iterations N --workers 2` (a first, untimed run fills the
  preprocessing cache); the per-iteration batch wait and step times are the ones the trainer
  records in its checkpoint (`history`).

Both on 2 torch threads; the first WARMUP iterations are left out. iterations/s = iterations /
(batch wait + step time). Runs by hand, about 7.5 minutes on 2 loaded cores once set up; the
ratio is printed last. On a shared machine run it twice, once with --fedseg-first.

    nice .venv/bin/python benchmarks/train_speed.py --nnunet-venv /path/to/nnunet_venv [--precision fp32 bf16]

`--precision` trains fedseg once per precision (fedseg's `--precision`: bf16 is bfloat16
autocast, fast on CPUs with AMX), each from the same round-0 model; nnU-Net trains in float32
on the CPU (its autocast is for CUDA only). Each run's update is kept as
WORK/fedseg_update_<precision>.safetensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import load_average, run_measured  # noqa: E402
from nnunet_peer import SITE, Peer, describe, mean  # noqa: E402

# Run with nnU-Net's python: its trainer's own data loader and train_step, timed.
NNUNET_LOOP = r"""
import json, os, sys, time, torch
from nnunetv2.run.run_training import get_trainer_from_args
n = int(sys.argv[1])
torch.set_num_threads(2)
trainer = get_trainer_from_args("2", "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans", device=torch.device("cpu"))
trainer.on_train_start()
trainer.on_train_epoch_start()
rows = []
for i in range(n):
    t0 = time.perf_counter()
    batch = next(trainer.dataloader_train)
    t1 = time.perf_counter()
    trainer.train_step(batch)
    t2 = time.perf_counter()
    rows.append({"data_wait_s": t1 - t0, "step_s": t2 - t1})
print("RESULT " + json.dumps(rows), flush=True)
# os._exit skips the clean-up that would stop the augmentation workers, so stop them first
# (otherwise they outlive the benchmark, holding memory and a little CPU)
for loader in (trainer.dataloader_train, trainer.dataloader_val):
    finish = getattr(loader, "_finish", None)
    if finish is not None:
        finish()
os._exit(0)
"""


def summarise(rows: list[dict], warmup: int) -> dict:
    rows = rows[warmup:]
    wait = sum(r["data_wait_s"] for r in rows)
    step = sum(r["step_s"] for r in rows)
    return {"n": len(rows), "it_per_s": len(rows) / (wait + step), "wait_s": wait, "step_s": step,
            "wait_per_it": wait / len(rows), "step_per_it": mean([r["step_s"] for r in rows])}


def fedseg_history(state: Path) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(state / "checkpoint.safetensors"), framework="numpy") as handle:
        return json.loads(handle.metadata()["state"])["history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-venv", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedseg_peer"))
    parser.add_argument("--iterations", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--fedseg-first", action="store_true",
                        help="run fedseg before nnU-Net (on a shared machine, compare both orders)")
    args = parser.parse_args()

    peer = Peer(args.work, args.nnunet_venv)
    peer.prepare(n_cases=10, size=64, test_size=96)
    config = peer.check_same_configuration()
    order = "fedseg first" if args.fedseg_first else "nnU-Net first"
    print(f"{describe(config)}; {args.iterations} iterations, first {args.warmup} left out; {order}; load {load_average()}")

    env = {**peer.env, "nnUNet_n_proc_DA": "2"}
    env.pop("OMP_NUM_THREADS")
    env.pop("MKL_NUM_THREADS")
    def run_nnunet():
        return run_measured([str(peer.venv / "bin" / "python"), "-c", NNUNET_LOOP, str(args.iterations)], env=env)

    if not args.fedseg_first:
        nn = run_nnunet()
    fedseg = {precision: train_fedseg(peer, args, env, precision) for precision in args.precision}
    if args.fedseg_first:
        nn = run_nnunet()
    nn_rows = json.loads(nn.stdout.split("RESULT ", 1)[1])

    a = summarise(nn_rows, args.warmup)
    print(f"{'':<46} {'it/s':>6} {'step s/it':>10} {'wait s/it':>10} {'wait %':>7} {'peak RSS MB':>12}")
    rows = [("nnU-Net nnUNetTrainer (loader + train_step)", a, nn)]
    rows += [(f"fedseg train --workers 2 --precision {p}", summarise(r, args.warmup), m) for p, (r, m, _) in fedseg.items()]
    for label, s, m in rows:
        print(f"{label:<46} {s['it_per_s']:>6.3f} {s['step_per_it']:>10.3f} {s['wait_per_it']:>10.3f} "
              f"{100 * s['wait_s'] / (s['wait_s'] + s['step_s']):>6.1f}% {m.peak_rss_mb:>12.0f}")
    print(f"whole commands: nnU-Net set-up + loop {nn.seconds:.1f} s; "
          + "; ".join(f"fedseg train --precision {p} {m.seconds:.1f} s (first run, preprocessing + 1 iteration, {first:.1f} s)"
                      for p, (_r, m, first) in fedseg.items()) + " (fedseg's include validation on its validation cases)")
    print(f"load after: {load_average()}")
    for label, s, _m in rows[1:]:
        print(f"ratio: {label} trains at {s['it_per_s'] / a['it_per_s']:.2f}x nnU-Net's iterations/s (target >= 1.3); "
              f"batch wait {s['wait_per_it']:.3f} s/it = {100 * s['wait_s'] / (s['wait_s'] + s['step_s']):.1f}% of its loop")


def train_fedseg(peer: Peer, args: argparse.Namespace, env: dict, precision: str) -> tuple[list[dict], object, float]:
    """`fedseg train --precision P` from round 0, after an untimed run that fills its cache:
    (per-iteration history, measured command, seconds of the first run)."""
    state, update = args.work / f"fedseg_state_{precision}", args.work / f"fedseg_update_{precision}.safetensors"
    train = [peer.fedseg_cli, "train", "--site", SITE, "--data", str(peer.raw), "--plans", str(peer.plans_path),
             "--weights", str(peer.fedseg / "round_000" / f"{SITE}.safetensors"), "--state", str(state),
             "-o", str(update), "--workers", "2", "--precision", precision, "--quiet"]
    shutil.rmtree(state, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([*train, "--iterations", "1"], env=env, check=True)   # fills the preprocessing cache
    first = time.perf_counter() - start
    for name in ("checkpoint.safetensors", "optimizer.safetensors"):
        (state / name).unlink(missing_ok=True)
    measured = run_measured([*train, "--iterations", str(args.iterations)], env=env)
    return fedseg_history(state), measured, first


if __name__ == "__main__":
    main()

"""Fingerprint speed and memory: `fedseg fingerprint` vs `nnUNetv2_extract_fingerprint`, and the floor.

One nnU-Net raw dataset (default 30 cases of 2 channels, 96×128×128 voxels, gzip NIfTI, a zero
frame around the body, two foreground labels; made once under WORK and reused), then, in one
run, each as a subprocess whose process tree is polled for its peak resident memory:

- `nnUNetv2_extract_fingerprint -d 1 -np 2` (nnU-Net's venv; `--clean` every time);
- `fedseg fingerprint --site pooled --data <the same folder> --workers 2`;
- the floor: read every image and label file once into numpy with SimpleITK (what both tools
  must at least do), in 1 process and split over 2 processes; also plain gzip decompression.

It then compares the values (nnU-Net's keys of fedseg's fingerprint vs nnU-Net's, relative
difference; Foundation requirement ≤ 1 %) and prints the ratios last.

    nice .venv/bin/python benchmarks/fingerprint_speed.py --nnunet-venv /path/to/nnunet_venv

Runs by hand: about 1 minute per --repeat on 2 loaded cores (about 15 s to make the data).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fingerprint_parity import CHANNELS, KEYS, rel, write_raw  # noqa: E402
from measure import Measured, load_average, run_measured  # noqa: E402


def make_case(i: int, shape: tuple[int, int, int], seed: int):
    """One case: body with a zero frame, gamma/normal intensities, a sphere label with a core."""
    rng = np.random.default_rng(seed + i)
    spacing = (float(rng.choice([1.0, 1.5, 2.5])), float(rng.uniform(0.7, 1.2)), float(rng.uniform(0.7, 1.2)))
    margin = [int(rng.integers(2, 9)) for _ in shape]
    body = tuple(slice(m, s - m) for m, s in zip(margin, shape))
    body_shape = tuple(s - 2 * m for m, s in zip(margin, shape))
    data = np.zeros((2, *shape), dtype=np.float32)
    offset = float(rng.uniform(-30, 30))
    data[0][body] = rng.gamma(4.0, 60.0, size=body_shape).astype(np.float32) + 200 + offset
    data[1][body] = rng.normal(120.0 + offset, 80.0, size=body_shape).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    center = [s // 2 + int(rng.integers(-5, 6)) for s in shape]
    radius = float(rng.uniform(10, 30))
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    dist = np.sqrt((zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2)
    seg[dist < radius] = 1
    seg[dist < radius / 2] = 2
    data[0][seg == 2] += 150.0
    return f"case_{i:03d}", data, seg, spacing


def make(root: Path, n_cases: int, shape: tuple[int, int, int], seed: int) -> None:
    if (root / "dataset.json").is_file():
        return
    write_raw(root, [make_case(i, shape, seed) for i in range(n_cases)])


# -- the floor: read every file once ----------------------------------------------------------
def _read_files(paths: list[str]) -> int:
    import SimpleITK as sitk

    return sum(int(sitk.GetArrayFromImage(sitk.ReadImage(p)).size) for p in paths)


def _gunzip_files(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with gzip.open(p, "rb") as handle:
            while chunk := handle.read(1 << 22):
                total += len(chunk)
    return total


def floor(kind: str, workers: int, paths: list[str]) -> None:
    """Read (or just gunzip) every file once, over `workers` processes; prints the time."""
    fn = _read_files if kind == "read" else _gunzip_files
    start = time.perf_counter()
    if workers == 1:
        fn(paths)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(fn, [paths[i::workers] for i in range(workers)]))
    print(json.dumps({"seconds": time.perf_counter() - start}))


def best(runs: list[Measured]) -> Measured:
    return min(runs, key=lambda m: m.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-venv", type=Path, required=True, help="virtual environment with nnunetv2 installed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedseg_fingerprint_speed"))
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 128, 128], help="z y x voxels of every case")
    parser.add_argument("--workers", type=int, default=2, help="processes, for nnU-Net (-np) and fedseg alike")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    raw, pre, res = args.work / "nnUNet_raw", args.work / "nnUNet_preprocessed", args.work / "nnUNet_results"
    dataset = raw / "Dataset001_Speed"
    start = time.perf_counter()
    make(dataset, args.cases, tuple(args.shape), args.seed)
    files = sorted(str(p) for p in (dataset / "imagesTr").iterdir()) + sorted(str(p) for p in (dataset / "labelsTr").iterdir())
    mb = sum(os.path.getsize(p) for p in files) / 1e6
    print(f"{args.cases} cases of {'x'.join(map(str, args.shape))} voxels, {len(CHANNELS)} channels, {len(files)} files, "
          f"{mb:.0f} MB gzip (ready in {time.perf_counter() - start:.1f} s) under {args.work}; load {load_average()}")

    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for p in files:   # warm the page cache for every reader alike
        Path(p).read_bytes()
    nn_cmd = [str(args.nnunet_venv / "bin" / "nnUNetv2_extract_fingerprint"), "-d", "1", "-np", str(args.workers), "--clean"]
    fedseg_cmd = [str(Path(sys.executable).with_name("fedseg")), "fingerprint", "--site", "pooled", "--data", str(dataset),
                  "-o", str(args.work / "fedseg_fingerprint.json"), "--workers", str(args.workers), "--quiet"]
    me = [sys.executable, str(Path(__file__).resolve())]
    nn = best([run_measured(nn_cmd, env=env) for _ in range(args.repeat)])
    fs = best([run_measured(fedseg_cmd, env=env) for _ in range(args.repeat)])
    floors, floor_cpu = {}, {}
    for kind, workers in (("read", 1), ("read", args.workers), ("gunzip", 1)):
        out = best([run_measured([*me, "floor", kind, str(workers), *files], env=env) for _ in range(args.repeat)])
        floors[(kind, workers)] = json.loads(out.stdout)["seconds"]
        floor_cpu[(kind, workers)] = out.cpu_seconds

    nn_fp = json.loads((pre / "Dataset001_Speed" / "dataset_fingerprint.json").read_text())
    ours = json.loads((args.work / "fedseg_fingerprint.json").read_text())
    from fedseg.planning.merge import merge_fingerprints

    merged = merge_fingerprints([ours])
    worst, worst_key = 0.0, ""
    for c in map(str, range(len(CHANNELS))):
        for key in KEYS:
            diff = rel(merged["foreground_intensity_properties_per_channel"][c][key],
                       nn_fp["foreground_intensity_properties_per_channel"][c][key])
            if diff > worst:
                worst, worst_key = diff, f"channel {c} {key}"
    print(f"parity: spacings equal {merged['spacings'] == nn_fp['spacings']}, shapes_after_crop equal "
          f"{merged['shapes_after_crop'] == [list(s) for s in nn_fp['shapes_after_crop']]}, "
          f"median_relative_size_after_crop nnU-Net {nn_fp['median_relative_size_after_cropping']:.6f} "
          f"fedseg {merged['median_relative_size_after_cropping']:.6f}, largest intensity difference "
          f"{worst:.3%} ({worst_key}; requirement 1 %)")
    print(f"{'':<44} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12} {'peak anon MB':>13}")
    for label, m in ((f"nnUNetv2_extract_fingerprint -np {args.workers}", nn),
                     (f"fedseg fingerprint --workers {args.workers}", fs)):
        print(f"{label:<44} {m.seconds:>7.2f} {m.cpu_seconds:>7.2f} {m.peak_rss_mb:>12.0f} {m.peak_anon_mb:>13.0f}")
    print(f"floor: SimpleITK read of every file, 1 process {floors[('read', 1)]:.2f} s ({floor_cpu[('read', 1)]:.2f} s "
          f"CPU with start-up), {args.workers} processes {floors[('read', args.workers)]:.2f} s; gzip decompression "
          f"alone (Python zlib), 1 process {floors[('gunzip', 1)]:.2f} s")
    print(f"load after: {load_average()}")
    print(f"ratio: fedseg is {nn.seconds / fs.seconds:.1f}x faster than nnU-Net (target >= 5), "
          f"{nn.cpu_seconds / fs.cpu_seconds:.1f}x less CPU; peak memory {fs.peak_rss_mb / nn.peak_rss_mb:.3f} of "
          f"nnU-Net's (target <= 0.25); fedseg = {fs.seconds / floors[('read', args.workers)]:.2f}x the "
          f"{args.workers}-process read floor, {fs.seconds / floors[('read', 1)]:.2f}x the 1-process one, CPU "
          f"{fs.cpu_seconds / floor_cpu[('read', 1)]:.2f}x the 1-process floor's (target <= 2)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        floor(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        main()

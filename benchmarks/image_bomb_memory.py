"""Peak memory of `fedseg predict` and `fedseg fingerprint` given an image bomb, and given an
honest image of known size.

The bomb is a complete, valid .nii.gz of 2^31 uint8 voxels (1024 x 1024 x 2048, all zero):
about 2 MB on disk, 2 GiB decompressed, 8 GiB as float32. Each command runs in its own
subprocess; its peak resident memory is `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`
read by a small wrapper process that runs nothing else.

    python benchmarks/image_bomb_memory.py --work /tmp/bomb_bench [--honest-size 256] [--predict-size 128]

The honest volumes are int16 (as a CT is stored); the float32 size is what fedseg holds.
Prints one line per measurement: command, exit code, peak RSS in MB, seconds, and the first
line of stderr. Everything is written under --work (deleted with --clean).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BOMB_SHAPE_XYZ = (1024, 1024, 2048)
CHUNK = 64 << 20


def write_nifti_bomb(path: Path) -> None:
    """Header for 2^31 uint8 voxels, then all of them (zeros), streamed through gzip."""
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(BOMB_SHAPE_XYZ)
    header.set_data_dtype(np.uint8)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    remaining = int(np.prod(BOMB_SHAPE_XYZ, dtype=np.int64))
    zeros = bytes(CHUNK)
    with gzip.open(path, "wb", compresslevel=9) as stream:
        stream.write(header.binaryblock + b"\x00" * 4)
        while remaining:
            n = min(remaining, CHUNK)
            stream.write(zeros[:n])
            remaining -= n


def write_honest_site(root: Path, size: int) -> Path:
    """A one-case 3D site (int16 CT-like volume of size^3 voxels, a cube of label 1)."""
    from fedseg.data.image_io import Geometry, write_segmentation, write_sitk

    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, size=(size, size, size), dtype=np.int16)
    label = np.zeros((size, size, size), dtype=np.uint8)
    label[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    geometry = Geometry((size, size, size), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), False)
    tmp = root / "imagesTr" / "case_000_0000"
    write_sitk(image, geometry, tmp, ".nii.gz")
    tmp.replace(root / "imagesTr" / "case_000_0000.nii.gz")
    write_segmentation(label, geometry, root / "labelsTr" / "case_000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 1, "file_ending": ".nii.gz",
    }))
    return root


def measure(cmd: list[str]) -> dict:
    """Run `cmd` under a wrapper process; the wrapper reports its children's peak RSS."""
    wrapper = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'rc': p.returncode, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
        " 'seconds': time.perf_counter() - t, 'stderr': (p.stderr.strip().splitlines() or [''])[-1][:160]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Scratch folder (created).")
    parser.add_argument("--honest-size", type=int, default=256, help="Edge of the honest int16 volume fingerprinted (voxels).")
    parser.add_argument("--predict-size", type=int, default=128,
                        help="Edge of the honest volume predicted (CPU time grows with its cube).")
    parser.add_argument("--clean", action="store_true", help="Delete --work afterwards.")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    # The interpreter running this script, so the fedseg it imports is the one measured.
    fedseg = [sys.executable, "-m", "fedseg.cli.main"]

    # A plan and round-0 weights to predict with: the tiny synthetic federation's site_a.
    sites = work / "sites"
    if not sites.is_dir():
        subprocess.run([*fedseg, "synth", str(sites), "--preset", "tiny", "-q"], check=True)
    subprocess.run([*fedseg, "fingerprint", "--site", "site_a", "--data", str(sites / "site_a"), "-o", str(work / "fp.json"), "-q"], check=True)
    # A large patch, so that predicting the honest volume takes few tiles on a CPU.
    subprocess.run([*fedseg, "plan", str(work / "fp.json"), "-o", str(work / "plans.json"), "-q",
                    "--set", "configuration.patch_size=64,64,64"], check=True)
    subprocess.run([*fedseg, "init", "--plans", str(work / "plans.json"), "-o", str(work / "round_000"), "-q"], check=True)

    bomb_site = work / "bomb_site"
    (bomb_site / "imagesTr").mkdir(parents=True, exist_ok=True)
    bomb = bomb_site / "imagesTr" / "case_000_0000.nii.gz"
    if not bomb.is_file():
        t = time.perf_counter()
        write_nifti_bomb(bomb)
        print(f"# bomb: {bomb.stat().st_size / 1e6:.1f} MB on disk, {np.prod(BOMB_SHAPE_XYZ)} voxels declared "
              f"(written in {time.perf_counter() - t:.0f} s)", flush=True)
    shutil.copytree(sites / "site_a" / "labelsTr", bomb_site / "labelsTr", dirs_exist_ok=True)
    shutil.copy(sites / "site_a" / "dataset.json", bomb_site / "dataset.json")
    honest = write_honest_site(work / "honest_site", args.honest_size)
    honest_mb = args.honest_size**3 * 4 / 2**20
    small = write_honest_site(work / "honest_small", args.predict_size)
    small_mb = args.predict_size**3 * 4 / 2**20

    runs = {
        "predict, 2^31-voxel bomb": [*fedseg, "predict", "--plans", str(work / "plans.json"),
                                      "--weights", str(work / "round_000" / "site_a.safetensors"),
                                      "-i", str(bomb_site / "imagesTr"), "-o", str(work / "pred_bomb"), "-q"],
        "fingerprint, 2^31-voxel bomb": [*fedseg, "fingerprint", "--site", "x", "--data", str(bomb_site),
                                          "-o", str(work / "fp_bomb.json"), "-q"],
        f"fingerprint, honest {args.honest_size}^3 int16 ({honest_mb:.0f} MB as float32)": [
            *fedseg, "fingerprint", "--site", "x", "--data", str(honest), "-o", str(work / "fp_honest.json"), "-q"],
        f"predict, honest {args.predict_size}^3 int16 ({small_mb:.0f} MB as float32), patch 64^3": [
            *fedseg, "predict", "--plans", str(work / "plans.json"),
            "--weights", str(work / "round_000" / "site_a.safetensors"),
            "-i", str(small / "imagesTr"), "-o", str(work / "pred_honest"), "-q"],
        "baseline: fedseg predict --help (interpreter + imports)": [*fedseg, "predict", "--help"],
    }
    print(f"{'measurement':<62} {'rc':>3} {'peak RSS MB':>12} {'s':>7}  stderr", flush=True)
    for name, cmd in runs.items():
        m = measure(cmd)
        print(f"{name:<62} {m['rc']:>3} {m['peak_rss_mb']:>12.0f} {m['seconds']:>7.1f}  {m['stderr']}", flush=True)
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

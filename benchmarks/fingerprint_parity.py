"""Compare fedseg's federated fingerprint (and plan) with nnU-Net's, on the same cases.

Builds a small pooled nnU-Net raw dataset (2 channels, varied spacing, a zero frame around
the body, two foreground labels of varied size), runs `nnUNetv2_extract_fingerprint` on it,
splits the same cases into 3 site folders, fingerprints each site with fedseg and merges,
then prints key-by-key differences. References computed here from all foreground voxels:
*by-case* (every case with foreground weighs 1 — nnU-Net's weighting, which fedseg's
nnU-Net keys compute) and *exact* (every voxel weighs 1 — fedseg's voxel-weighted keys). With --plan it also runs `nnUNetv2_plan_experiment` and compares
the 3d_fullres configuration with fedseg's plan at budget 8 (nnU-Net's 8 GB default).

nnU-Net needs its own environment (it pins torch and other packages); pass its venv:

    python benchmarks/fingerprint_parity.py --nnunet-venv /path/to/nnunet_venv [--plan]

Runs by hand (not part of the test suite); everything is written under a temporary folder.
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

import numpy as np
import SimpleITK as sitk

from fedseg.data.cropping import crop_to_nonzero
from fedseg.data.dataset import load_dataset
from fedseg.data.image_io import read_image
from fedseg.planning.fingerprint import compute_fingerprint, save_fingerprint
from fedseg.planning.merge import merge_fingerprints
from fedseg.planning.planner import make_plans

CHANNELS = {"0": "T1", "1": "T2"}
LABELS = {"background": 0, "organ": 1, "lesion": 2}
KEYS = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")


def make_cases(n_cases: int, size: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        shape = tuple(int(size + d) for d in rng.integers(-6, 7, size=3))
        spacing = (float(rng.choice([1.0, 1.5, 2.5])), float(rng.uniform(0.7, 1.2)), float(rng.uniform(0.7, 1.2)))
        margin = [int(rng.integers(2, 7)) for _ in shape]
        body = tuple(slice(m, s - m) for m, s in zip(margin, shape))
        body_shape = tuple(s - 2 * m for m, s in zip(margin, shape))
        data = np.zeros((2, *shape), dtype=np.float32)
        offset = float(rng.uniform(-30, 30))                 # case-specific intensity shift
        data[0][body] = rng.gamma(4.0, 60.0, size=body_shape) + 200 + offset
        data[1][body] = rng.normal(120.0 + offset, 80.0, size=body_shape)   # negatives too
        seg = np.zeros(shape, dtype=np.uint8)
        center = [s // 2 + int(rng.integers(-3, 4)) for s in shape]
        radius = float(rng.uniform(6, 14))                   # foreground size varies per case
        zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
        dist = np.sqrt((zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2)
        seg[dist < radius] = 1
        seg[dist < radius / 2] = 2
        data[0][seg == 2] += 150.0                           # the lesion is brighter
        cases.append((f"case_{i:03d}", data, seg, spacing))
    return cases


def write_raw(root: Path, cases) -> None:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case_id, data, seg, spacing in cases:
        for c in range(data.shape[0]):
            _write(data[c], spacing, root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
        _write(seg, spacing, root / "labelsTr" / f"{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": CHANNELS, "labels": LABELS, "numTraining": len(cases), "file_ending": ".nii.gz",
         "name": "Parity"}, indent=2))


def _write(array: np.ndarray, spacing, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(spacing[::-1]))
    sitk.WriteImage(image, str(path), useCompression=True)


def exact_stats(cases) -> dict[str, dict[str, float]]:
    """The intended values: statistics of ALL foreground voxels after nnU-Net's crop."""
    out = {}
    for c in range(len(CHANNELS)):
        fg = []
        for _, data, seg, _ in cases:
            cropped, cropped_seg, _ = crop_to_nonzero(data, seg.astype(np.int16))
            fg.append(cropped[c][cropped_seg > 0].astype(np.float64))
        fg = np.concatenate(fg)
        p005, median, p995 = np.percentile(fg, (0.5, 50.0, 99.5))
        out[str(c)] = {"mean": fg.mean(), "std": fg.std(), "median": median, "min": fg.min(), "max": fg.max(),
                       "percentile_00_5": p005, "percentile_99_5": p995}
    return out


def case_weighted_stats(cases) -> dict[str, dict[str, float]]:
    """The same statistics with nnU-Net's weighting: every case counts equally, not every voxel.

    nnU-Net draws the same number of foreground samples from each case, so its values
    estimate these (up to sampling noise); quantiles here use the weighted inverted CDF
    (the smallest sorted value whose cumulative weight reaches q * total weight), the rule
    of fedseg's case-weighted sketch and the limit of nnU-Net's percentiles.
    """
    out = {}
    for c in range(len(CHANNELS)):
        values, weights = [], []
        for _, data, seg, _ in cases:
            cropped, cropped_seg, _ = crop_to_nonzero(data, seg.astype(np.int16))
            fg = cropped[c][cropped_seg > 0].astype(np.float64)
            if fg.size == 0:
                continue                                     # nnU-Net samples nothing from such a case
            values.append(fg)
            weights.append(np.full(fg.size, 1.0 / fg.size))
        v, w = np.concatenate(values), np.concatenate(weights)
        order = np.argsort(v, kind="stable")
        v, w = v[order], w[order]
        cdf = np.cumsum(w) / w.sum()
        mean = float(np.average(v, weights=w))
        std = float(np.sqrt(np.average((v - mean) ** 2, weights=w)))

        def quantile(q: float) -> float:
            return float(v[min(np.searchsorted(cdf, q), v.size - 1)])

        out[str(c)] = {"mean": mean, "std": std, "median": quantile(0.5), "min": v[0], "max": v[-1],
                       "percentile_00_5": quantile(0.005), "percentile_99_5": quantile(0.995)}
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def run_nnunet(venv: Path, env: dict, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / args[0]), *args[1:]], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-venv", type=Path, required=True, help="virtual environment with nnunetv2 installed")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--size", type=int, default=48, help="approximate edge length of each case, voxels")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes, for nnU-Net (-np) and fedseg alike")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", action="store_true", help="also compare nnUNetv2_plan_experiment's 3d_fullres plan")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder instead of a temporary one")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="fedseg_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    cases = make_cases(args.cases, args.size, args.seed)

    # pooled nnU-Net dataset
    raw, pre, res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    write_raw(raw / "Dataset001_Parity", cases)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res)}
    nn_time = run_nnunet(args.nnunet_venv, env, ["nnUNetv2_extract_fingerprint", "-d", "1", "-np", str(args.workers)])
    nn_fp = json.loads((pre / "Dataset001_Parity" / "dataset_fingerprint.json").read_text())

    # the same cases split over sites, fingerprinted by fedseg (library, then CLI) and merged
    site_dirs = []
    for s, chunk in enumerate(np.array_split(np.arange(len(cases)), args.sites)):
        site_dir = work / "sites" / f"site_{s + 1}"
        write_raw(site_dir, [cases[i] for i in chunk])
        site_dirs.append(site_dir)
    start = time.perf_counter()
    fps = [compute_fingerprint(load_dataset(d), d.name, workers=args.workers) for d in site_dirs]
    merged = merge_fingerprints(fps)
    lib_time = time.perf_counter() - start
    fedseg_cli = Path(sys.executable).with_name("fedseg")
    start = time.perf_counter()
    for d in site_dirs:
        subprocess.run([str(fedseg_cli), "fingerprint", "--site", d.name, "--data", str(d), "-o",
                        str(work / "fp" / f"{d.name}.json"), "--workers", str(args.workers), "--quiet"], check=True)
    cli_time = time.perf_counter() - start
    for fp in fps:
        save_fingerprint(fp, work / "fp_lib" / f"{fp['site']}.json")

    # the floor for any fingerprint: decompress and read every file once, one process
    start = time.perf_counter()
    for d in site_dirs:
        for path in sorted((d / "imagesTr").iterdir()) + sorted((d / "labelsTr").iterdir()):
            read_image(path)
    read_time = time.perf_counter() - start
    start = time.perf_counter()
    for d in site_dirs:
        compute_fingerprint(load_dataset(d), d.name, workers=1)
    lib1_time = time.perf_counter() - start

    exact = exact_stats(cases)
    by_case = case_weighted_stats(cases)
    print(f"{len(cases)} cases of ~{args.size}^3 voxels, {len(CHANNELS)} channels, {args.sites} sites; work folder {work}")
    print()
    print(f"spacings equal:                  {merged['spacings'] == nn_fp['spacings']}")
    print(f"shapes_after_crop equal:         {merged['shapes_after_crop'] == [list(s) for s in nn_fp['shapes_after_crop']]}")
    print(f"median_relative_size_after_crop: nnU-Net {nn_fp['median_relative_size_after_cropping']:.6f} "
          f"fedseg {merged['median_relative_size_after_cropping']:.6f}")
    print()
    print("fedseg = merged foreground_intensity_properties_per_channel (each case weighs 1, as nnU-Net);")
    print("by-case = the same weighting computed here from all voxels; voxel = fedseg's ..._voxel_weighted key;")
    print("exact = all foreground voxels, each voxel weighted equally.")
    header = (f"{'ch':>2} {'key':<16} {'nnU-Net':>11} {'fedseg':>11} {'by-case':>11} {'voxel':>11} {'exact':>11} "
              f"{'fedseg/nnU':>10} {'fedseg/bc':>9} {'nnU/bc':>7} {'voxel/ex':>8} {'voxel/nnU':>9}")
    print(header)
    print("-" * len(header))
    worst = {"fedseg_vs_nnunet": 0.0, "fedseg_vs_by_case": 0.0, "voxel_vs_exact": 0.0, "voxel_vs_nnunet": 0.0}
    for c in map(str, range(len(CHANNELS))):
        nn = nn_fp["foreground_intensity_properties_per_channel"][c]
        fs = merged["foreground_intensity_properties_per_channel"][c]
        vx = merged["foreground_intensity_properties_per_channel_voxel_weighted"][c]
        for key in KEYS:
            ex, bc = exact[c][key], by_case[c][key]
            row = {"fedseg_vs_nnunet": rel(fs[key], nn[key]), "fedseg_vs_by_case": rel(fs[key], bc),
                   "voxel_vs_exact": rel(vx[key], ex), "voxel_vs_nnunet": rel(vx[key], nn[key])}
            for name, value in row.items():
                worst[name] = max(worst[name], value)
            print(f"{c:>2} {key:<16} {nn[key]:>11.4f} {fs[key]:>11.4f} {bc:>11.4f} {vx[key]:>11.4f} {ex:>11.4f} "
                  f"{row['fedseg_vs_nnunet']:>10.3%} {row['fedseg_vs_by_case']:>9.3%} {rel(nn[key], bc):>7.3%} "
                  f"{row['voxel_vs_exact']:>8.3%} {row['voxel_vs_nnunet']:>9.3%}")
    print()
    print(f"largest relative difference: fedseg vs nnU-Net {worst['fedseg_vs_nnunet']:.3%} (requirement 1%), "
          f"fedseg vs by-case {worst['fedseg_vs_by_case']:.3%} (sketch bound "
          f"{merged['quantile_relative_accuracy']:.1%}), voxel-weighted vs exact {worst['voxel_vs_exact']:.3%}, "
          f"voxel-weighted vs nnU-Net {worst['voxel_vs_nnunet']:.3%}")
    print(f"time: nnUNetv2_extract_fingerprint -np {args.workers}: {nn_time:.2f} s | "
          f"fedseg fingerprint CLI x{args.sites} (--workers {args.workers}): {cli_time:.2f} s "
          f"({nn_time / cli_time:.1f}x faster) | fedseg library, all sites + merge: {lib_time:.2f} s "
          f"({nn_time / lib_time:.1f}x faster)")
    print(f"time, one process: read every file: {read_time:.2f} s | fedseg library fingerprint of all sites: "
          f"{lib1_time:.2f} s ({lib1_time / read_time:.2f}x the read time)")

    if args.plan:
        run_nnunet(args.nnunet_venv, env, ["nnUNetv2_plan_experiment", "-d", "1"])
        nn_plans = json.loads((pre / "Dataset001_Parity" / "nnUNetPlans.json").read_text())
        nn_cfg = nn_plans["configurations"]["3d_fullres"]
        arch = nn_cfg["architecture"]["arch_kwargs"]
        ours = make_plans(fps, "fedavg", budget=8.0).configuration_for(None)
        rows = [
            ("spacing", [round(s, 6) for s in nn_cfg["spacing"]], [round(s, 6) for s in ours.spacing]),
            ("patch_size", nn_cfg["patch_size"], ours.patch_size),
            ("batch_size", nn_cfg["batch_size"], ours.batch_size),
            ("n_stages", arch["n_stages"], ours.network.n_stages),
            ("strides", arch["strides"], ours.network.strides),
            ("kernel_sizes", arch["kernel_sizes"], ours.network.kernel_sizes),
            ("features", arch["features_per_stage"], ours.network.features_per_stage),
            ("normalization", nn_cfg["normalization_schemes"], ours.normalization_schemes),
            ("use_mask_for_norm", nn_cfg["use_mask_for_norm"], ours.use_mask_for_norm),
        ]
        print()
        print("3d_fullres plan, nnU-Net (8 GB) vs fedseg (--budget 8):")
        for key, theirs, mine in rows:
            same = json.loads(json.dumps(theirs)) == json.loads(json.dumps(mine))
            print(f"  {key:<18} {'same' if same else 'DIFFERENT'}: nnU-Net {theirs} | fedseg {mine}")


if __name__ == "__main__":
    main()

"""Both directions of nnU-Net interoperability, checked against nnU-Net itself.

    python benchmarks/nnunet_interop.py --nnunet-venv DIR [--work DIR] [--write-fixture tests/fixtures/nnunet]

1. fedseg -> nnU-Net: a tiny federation (`tiny` preset, fedavg, a few rounds of a few
   iterations), `fedseg export nnunet`, then `nnUNetv2_predict` on the exported model and
   `fedseg predict` on the same test images (all sites' imagesTs): per-case Dice agreement
   of every foreground label, without test-time mirroring (`--disable_tta`; fedseg's
   default) and, with `--with-mirroring`, with it (nnU-Net's default, `--mirror` for fedseg).
2. nnU-Net -> fedseg: `nnUNetv2_plan_and_preprocess` + `nnUNetv2_train` on one site's
   training cases (CPU, a trainer of 2 epochs × 15 iterations), then `fedseg plan
   --from-nnunet` + `fedseg init --from-nnunet`, and `fedseg predict` with the round-0
   model vs `nnUNetv2_predict` with nnU-Net's model, same comparison.

nnunetv2 lives in its own venv (never a fedseg dependency). nnU-Net reads its folders from
the nnUNet_raw / nnUNet_preprocessed / nnUNet_results environment variables: they are set
only in the environment of the nnU-Net subprocesses started here.

nnU-Net's shortest built-in trainers run 250 iterations per epoch, so this script adds a
trainer class to the venv's nnunetv2 package, as nnU-Net documents for custom trainers
(nnunetv2/training/nnUNetTrainer/<name>.py). `--write-fixture DIR` writes the schema
fixture the unit tests compare fedseg's export with: nnU-Net's plans.json, dataset.json,
dataset_fingerprint.json and the structure (keys, types, tensor shapes) of its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_EXPORT = "Dataset501_FedsegTiny"
DATASET_NNUNET = "Dataset502_NnunetTiny"
TRAINER = "nnUNetTrainer_fedsegShort"
TRAINER_SOURCE = '''import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_fedsegShort(nnUNetTrainer):
    """nnUNetTrainer for a CPU smoke run: 2 epochs of 15 iterations (written by fedseg's benchmarks/nnunet_interop.py)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 15
        self.num_val_iterations_per_epoch = 3
'''
REQUIRED_AGREEMENT = 0.99


class Tools:
    def __init__(self, work: Path, venv: Path) -> None:
        self.work = work
        self.venv = venv
        self.nnunet_env = {
            **os.environ,
            "nnUNet_raw": str(work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
            "nnUNet_results": str(work / "nnUNet_results"),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "nnUNet_compile": "false",
        }
        self.fedseg_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.seconds: dict[str, float] = {}

    def _run(self, label: str, argv: list[str], env: dict[str, str]) -> None:
        start = time.monotonic()
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.seconds[label] = self.seconds.get(label, 0.0) + time.monotonic() - start
        if proc.returncode != 0:
            sys.exit(f"{label} failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stdout[-3000:]}")
        print(f"  {label}: {self.seconds[label]:.1f} s", flush=True)

    def fedseg(self, label: str, *args: str) -> None:
        self._run(label, [sys.executable, "-m", "fedseg.cli.main", *args], self.fedseg_env)

    def nnunet(self, label: str, command: str, *args: str, env: dict[str, str] | None = None) -> None:
        self._run(label, [str(self.venv / "bin" / command), *args], env or self.nnunet_env)

    def nnunet_python(self, code: str) -> str:
        out = subprocess.run([str(self.venv / "bin" / "python"), "-c", code], env=self.nnunet_env,
                             stdout=subprocess.PIPE, text=True, check=True)
        return out.stdout.strip()


def gather_test_images(sites: Path, out: Path) -> list[str]:
    """Every site's imagesTs in one folder (site-prefixed case names) and the labels beside."""
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    cases = []
    for site in sorted(p for p in sites.iterdir() if (p / "dataset.json").is_file()):
        for image in sorted((site / "imagesTs").iterdir()):
            shutil.copy(image, out / "images" / f"{site.name}_{image.name}")
        for label in sorted((site / "labelsTs").iterdir()):
            shutil.copy(label, out / "labels" / f"{site.name}_{label.name}")
            cases.append(f"{site.name}_{label.name}")
    return cases


def read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def agreement(dir_a: Path, dir_b: Path, cases: list[str], labels: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per case, per foreground label: Dice between the two tools' label maps (1 when both are empty)."""
    out = {}
    for case in cases:
        a, b = read_labels(dir_a / case), read_labels(dir_b / case)
        if a.shape != b.shape:
            sys.exit(f"{case}: shapes differ {a.shape} vs {b.shape}")
        per_label = {}
        for name, value in labels.items():
            if value == 0:
                continue
            x, y = a == value, b == value
            total = int(x.sum() + y.sum())
            per_label[name] = 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total
        per_label["voxels_differing"] = int((a != b).sum())
        out[case] = per_label
    return out


def summarise(title: str, table: dict[str, dict[str, float]], labels: dict[str, int]) -> float:
    print(f"\n{title}")
    names = [n for n, v in labels.items() if v != 0]
    print(f"  {'case':32s} " + " ".join(f"{n:>10s}" for n in names) + "  differing voxels")
    for case, row in table.items():
        print(f"  {case:32s} " + " ".join(f"{row[n]:10.4f}" for n in names) + f"  {row['voxels_differing']:>8d}")
    worst = min(row[n] for row in table.values() for n in names)
    print(f"  lowest per-case Dice agreement: {worst:.4f}")
    return worst


def install_trainer(tools: Tools) -> None:
    folder = Path(tools.nnunet_python(
        "import os, nnunetv2.training.nnUNetTrainer as m; print(os.path.dirname(m.__file__))"))
    target = folder / f"{TRAINER}.py"
    if not target.is_file() or target.read_text() != TRAINER_SOURCE:
        target.write_text(TRAINER_SOURCE)


def fedseg_to_nnunet(tools: Tools, work: Path, rounds: int, iterations: int, cases: list[str], labels: dict,
                     variants: list) -> dict:
    run = work / "run"
    tools.fedseg("fedseg simulate", "simulate", str(work / "sites"), "--strategy", "fedavg", "--rounds", str(rounds),
                 "--iterations", str(iterations), "--workers", "0", "-o", str(run), "--quiet")
    model = run / f"round_{rounds:03d}" / "models" / "global.safetensors"
    exported = work / "exported_results"
    tools.fedseg("fedseg export nnunet", "export", "nnunet", "--plans", str(run / "plans.json"), "--weights", str(model),
                 "--dataset", DATASET_EXPORT, "-o", str(exported))
    env = {**tools.nnunet_env, "nnUNet_results": str(exported)}
    images = str(work / "test" / "images")
    results = {}
    for tta, nn_flags, fs_flags in variants:
        nn_out, fs_out = work / f"export_nnunet_{len(nn_flags)}", work / f"export_fedseg_{len(nn_flags)}"
        tools.nnunet(f"nnUNetv2_predict ({tta})", "nnUNetv2_predict", "-i", images, "-o", str(nn_out), "-d", "501",
                     "-c", "3d_fullres", "-f", "all", "-device", "cpu", "-npp", "1", "-nps", "1",
                     "--disable_progress_bar", *nn_flags, env=env)
        tools.fedseg(f"fedseg predict ({tta})", "predict", "--plans", str(run / "plans.json"), "--weights", str(model),
                     "-i", images, "-o", str(fs_out), "--quiet", *fs_flags)
        table = agreement(nn_out, fs_out, cases, labels)
        results[tta] = {"per_case": table, "lowest": summarise(
            f"fedseg -> nnU-Net, {tta}: Dice(nnUNetv2_predict on the export, fedseg predict)", table, labels)}
    return results


def nnunet_to_fedseg(tools: Tools, work: Path, cases: list[str], labels: dict, variants: list) -> tuple[dict, Path]:
    site = work / "sites" / "site_a"
    raw = work / "nnUNet_raw" / DATASET_NNUNET
    raw.mkdir(parents=True)
    shutil.copytree(site / "imagesTr", raw / "imagesTr")
    shutil.copytree(site / "labelsTr", raw / "labelsTr")
    dataset_json = json.loads((site / "dataset.json").read_text())
    dataset_json["name"] = DATASET_NNUNET.split("_", 1)[1]
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    tools.nnunet("nnUNetv2_plan_and_preprocess", "nnUNetv2_plan_and_preprocess", "-d", "502", "-c", "3d_fullres",
                 "-np", "1", "-npfp", "1")
    install_trainer(tools)
    # no augmentation worker processes (the planner needs a positive value, so only here)
    tools.nnunet("nnUNetv2_train", "nnUNetv2_train", "502", "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu",
                 env={**tools.nnunet_env, "nnUNet_n_proc_DA": "0"})
    trainer_folder = work / "nnUNet_results" / DATASET_NNUNET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    fingerprints = sorted(str(p) for p in (work / "run" / "fingerprints").glob("*.json"))
    plans = work / "from_nnunet" / "plans.json"
    tools.fedseg("fedseg plan --from-nnunet", "plan", *fingerprints, "--from-nnunet", str(trainer_folder),
                 "-o", str(plans), "--quiet")
    tools.fedseg("fedseg init --from-nnunet", "init", "--plans", str(plans), "--from-nnunet", str(trainer_folder),
                 "-o", str(work / "from_nnunet" / "round_000"), "--quiet")
    model = work / "from_nnunet" / "round_000" / "models" / "global.safetensors"
    images = str(work / "test" / "images")
    results = {}
    for tta, nn_flags, fs_flags in variants:
        nn_out, fs_out = work / f"import_nnunet_{len(nn_flags)}", work / f"import_fedseg_{len(nn_flags)}"
        tools.nnunet(f"nnUNetv2_predict ({tta})", "nnUNetv2_predict", "-i", images, "-o", str(nn_out), "-d", "502",
                     "-c", "3d_fullres", "-f", "all", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
                     "--disable_progress_bar", *nn_flags)
        tools.fedseg(f"fedseg predict ({tta})", "predict", "--plans", str(plans), "--weights", str(model),
                     "-i", images, "-o", str(fs_out), "--quiet", *fs_flags)
        table = agreement(nn_out, fs_out, cases, labels)
        results[tta] = {"per_case": table, "lowest": summarise(
            f"nnU-Net -> fedseg, {tta}: Dice(nnUNetv2_predict, fedseg predict after init --from-nnunet)", table, labels)}
    return results, trainer_folder


def write_fixture(trainer_folder: Path, out: Path, versions: dict[str, str]) -> None:
    """nnU-Net's JSON files and its checkpoint's structure (no weights: only names, types, shapes)."""
    from fedseg.federation.nnunet_checkpoint import load_checkpoint_dict

    out.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(trainer_folder / name, out / name)
    checkpoint = load_checkpoint_dict(trainer_folder / "fold_all" / "checkpoint_final.pth")
    schema = {
        "made_by": "benchmarks/nnunet_interop.py --write-fixture (nnUNetv2_train, trainer " + TRAINER + ")",
        "versions": versions,
        "top_level": {k: type(v).__name__ for k, v in checkpoint.items()},
        "init_args": {k: type(v).__name__ for k, v in checkpoint["init_args"].items()},
        "init_args_configuration": checkpoint["init_args"]["configuration"],
        "init_args_fold": checkpoint["init_args"]["fold"],
        "inference_allowed_mirroring_axes": list(checkpoint["inference_allowed_mirroring_axes"]),
        "network_weights": {k: list(v.shape) for k, v in checkpoint["network_weights"].items()},
    }
    (out / "checkpoint_schema.json").write_text(json.dumps(schema, indent=1) + "\n")
    print(f"\nwrote the schema fixture to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnunet-venv", type=Path, required=True, help="venv with nnunetv2 installed")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--with-mirroring", action="store_true",
                        help="also compare with test-time mirroring (nnU-Net's default; 8x the CPU time)")
    parser.add_argument("--write-fixture", type=Path, default=None, help="write the schema fixture here")
    parser.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    args = parser.parse_args()

    from fedseg.synth import generate

    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet_interop_"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work} is not empty")
    tools = Tools(work.resolve(), args.nnunet_venv.resolve())
    versions = {
        "nnunetv2": tools.nnunet_python("import importlib.metadata as m; print(m.version('nnunetv2'))"),
        "dynamic_network_architectures": tools.nnunet_python(
            "import importlib.metadata as m; print(m.version('dynamic_network_architectures'))"),
        "torch (nnU-Net venv)": tools.nnunet_python("import torch; print(torch.__version__)"),
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load {Path('/proc/loadavg').read_text().split()[:3]}; {versions}")
    start = time.monotonic()
    generate(work / "sites", preset="tiny", seed=0)
    cases = gather_test_images(work / "sites", work / "test")
    labels = json.loads((work / "sites" / "site_a" / "dataset.json").read_text())["labels"]

    print("\nfedseg -> nnU-Net")
    variants = [("no mirroring", ["--disable_tta"], [])]
    if args.with_mirroring:
        variants.append(("mirroring", [], ["--mirror"]))
    export = fedseg_to_nnunet(tools, tools.work, args.rounds, args.iterations, cases, labels, variants)
    print("\nnnU-Net -> fedseg")
    imported, trainer_folder = nnunet_to_fedseg(tools, tools.work, cases, labels, variants)
    if args.write_fixture is not None:
        write_fixture(trainer_folder, args.write_fixture, versions)

    lowest = min(r["lowest"] for r in (*export.values(), *imported.values()))
    summary = {
        "versions": versions, "cases": len(cases), "export": export, "import": imported,
        "seconds": tools.seconds, "total_seconds": time.monotonic() - start, "lowest_agreement": lowest,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))
    print(f"\n{len(cases)} test cases; lowest per-case, per-label Dice agreement over both directions: {lowest:.4f} "
          f"(required ≥ {REQUIRED_AGREEMENT}); total {summary['total_seconds']:.0f} s")
    if args.work is None:
        shutil.rmtree(work)
    if lowest < REQUIRED_AGREEMENT:
        sys.exit(1)


if __name__ == "__main__":
    main()

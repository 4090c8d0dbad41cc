"""Shared set-up of train_speed.py and predict_speed.py: one dataset, planned by both tools.

Under WORK (made once, reused; `prepare` skips every step whose output exists):

    nnUNet_raw/Dataset002_Peer/        nnU-Net raw format: imagesTr, labelsTr, imagesTs, dataset.json
    nnUNet_preprocessed/Dataset002_Peer/   nnUNetv2_plan_and_preprocess -c 3d_fullres
    fedseg/plans.json, fedseg/round_000/   fedseg fingerprint + plan --budget 8 (nnU-Net's 8 GB
                                           default, so both pick the same patch, batch and network)

The same cases are one fedseg site, `site_a`: fedseg reads the nnU-Net raw folder as it is.
`check_same_configuration` refuses to benchmark when the two plans differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fingerprint_parity import _write, make_cases, write_raw  # noqa: E402

DATASET = "Dataset002_Peer"
SITE = "site_a"


class Peer:
    def __init__(self, work: Path, nnunet_venv: Path) -> None:
        self.work = work
        self.venv = nnunet_venv
        self.raw = work / "nnUNet_raw" / DATASET
        self.pre = work / "nnUNet_preprocessed" / DATASET
        self.results = work / "nnUNet_results"
        self.fedseg = work / "fedseg"
        self.env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"),
                    "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"), "nnUNet_results": str(self.results),
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.fedseg_cli = str(Path(sys.executable).with_name("fedseg"))

    @property
    def plans_path(self) -> Path:
        return self.fedseg / "plans.json"

    def nnunet(self, *args: str) -> None:
        subprocess.run([str(self.venv / "bin" / args[0]), *args[1:]], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def fedseg_run(self, *args: str) -> None:
        subprocess.run([self.fedseg_cli, *args, "--quiet"], check=True, stdout=subprocess.DEVNULL)

    def prepare(self, n_cases: int, size: int, test_size: int, seed: int = 0) -> None:
        if not (self.raw / "dataset.json").is_file():
            write_raw(self.raw, make_cases(n_cases, size, seed))
        if not (self.raw / "imagesTs").is_dir():
            # one larger test volume, so that prediction slides over several tiles; at about the
            # planned spacing, so that resampling does not change its size much
            _case_id, data, _seg, _spacing = make_cases(1, test_size, seed + 1)[0]
            (self.raw / "imagesTs").mkdir()
            for c in range(data.shape[0]):
                _write(data[c], (1.0, 0.8, 0.9), self.raw / "imagesTs" / f"test_000_{c:04d}.nii.gz")
        if not (self.pre / "nnUNetPlans.json").is_file():
            self.nnunet("nnUNetv2_plan_and_preprocess", "-d", "2", "-c", "3d_fullres", "-np", "2")
        if not (self.fedseg / "round_000").is_dir():
            self.fedseg_run("fingerprint", "--site", SITE, "--data", str(self.raw), "-o", str(self.fedseg / "fp.json"),
                            "--workers", "2")
            self.fedseg_run("plan", str(self.fedseg / "fp.json"), "-o", str(self.plans_path), "--budget", "8")
            self.fedseg_run("init", "--plans", str(self.plans_path), "-o", str(self.fedseg / "round_000"))

    def check_same_configuration(self) -> dict:
        """nnU-Net's and fedseg's 3d_fullres: patch, batch, spacing, network must agree."""
        nn_cfg = json.loads((self.pre / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
        arch = nn_cfg["architecture"]["arch_kwargs"]
        ours = json.loads(self.plans_path.read_text())["configurations"]["3d_fullres"]
        pairs = {
            "patch_size": (nn_cfg["patch_size"], ours["patch_size"]),
            "batch_size": (nn_cfg["batch_size"], ours["batch_size"]),
            "spacing": ([round(s, 6) for s in nn_cfg["spacing"]], [round(s, 6) for s in ours["spacing"]]),
            "features_per_stage": (arch["features_per_stage"], ours["network"]["features_per_stage"]),
            "strides": (arch["strides"], ours["network"]["strides"]),
            "kernel_sizes": (arch["kernel_sizes"], ours["network"]["kernel_sizes"]),
            "n_conv_per_stage": (arch["n_conv_per_stage"], ours["network"]["n_conv_per_stage"]),
        }
        different = {k: v for k, v in pairs.items() if json.dumps(v[0]) != json.dumps(v[1])}
        if different:
            raise SystemExit(f"nnU-Net and fedseg planned different 3d_fullres configurations: {different}")
        return {k: v[0] for k, v in pairs.items()}


def describe(config: dict) -> str:
    return (f"3d_fullres patch {config['patch_size']}, batch {config['batch_size']}, features "
            f"{config['features_per_stage']}, spacing {config['spacing']}")


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")

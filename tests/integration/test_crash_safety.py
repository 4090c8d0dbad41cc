"""kill -9 in the middle of `fedseg aggregate` and `fedseg train`, then run again.

Whatever moment a process dies at, every output file that exists is complete and valid (files
are written under a temporary name and renamed), a round folder without aggregate.json is not
taken as complete, and running the same command again gives exactly a clean run's files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedseg.federation.routes import attach_routes
from fedseg.federation.site_update import write_site_update
from fedseg.federation.weightfile import read_weight_file
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec

# ~8 MB per tensor: big enough that writing the outputs takes a while, small enough for tmp.
BIG = {
    "encoder.stages.0.conv.weight": {"shape": [2048, 1024], "dtype": "float32"},
    "encoder.stages.0.conv.bias": {"shape": [1024], "dtype": "float32"},
    "decoder.seg_layers.0.weight": {"shape": [1024, 1024], "dtype": "float32"},
}


def big_plans() -> Plans:
    network = NetworkSpec(n_stages=1, features_per_stage=[4], kernel_sizes=[[3, 3, 3]], strides=[[1, 1, 1]],
                          n_conv_per_stage=[1], n_conv_per_stage_decoder=[])
    config = ConfigurationPlan(name="3d_fullres", spacing=[1.0] * 3, patch_size=[16] * 3, median_image_size_in_voxels=[16] * 3,
                               batch_size=2, normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
                               network=network)
    return attach_routes(Plans(dataset_name="crash", channel_names={"0": "T1"}, labels={"background": 0, "x": 1}, file_ending=".nii.gz",
                 fingerprint={}, sites={s: SiteInfo("MRI", ["T1"], n) for s, n in (("A", 2), ("B", 3), ("C", 4))},
                 strategy=StrategySpec("fedavg", {}), configurations={"3d_fullres": config},
                 default_configuration="3d_fullres", extra={"manifests": {"3d_fullres": BIG}}))


def fedseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedseg.cli.main", *args]


def kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL `process` as soon as `ready()` is true; False when it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.kill()
    raise AssertionError("the condition to kill at never came")


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")] if folder.exists() else []


def assert_outputs_whole(folder: Path) -> None:
    """Every weight file present reads back with a valid content hash."""
    for path in folder.rglob("*.safetensors"):
        if not path.name.startswith("."):
            read_weight_file(path)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "aggregate.json"}


def test_aggregate_killed_mid_write_then_rerun(tmp_path: Path) -> None:
    plans = big_plans()
    plans_path = tmp_path / "plans.json"
    plans.save(plans_path)
    rng = np.random.default_rng(0)
    updates = []
    for site in sorted(plans.sites):
        state = {n: rng.standard_normal(e["shape"]).astype(np.float32) for n, e in BIG.items()}
        path = tmp_path / "round_001" / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, state, path, round_index=1, n_iterations=1)
        updates.append(str(path))

    clean = tmp_path / "clean"
    subprocess.run(fedseg("aggregate", "--plans", str(plans_path), *updates, "-o", str(clean), "-q"), check=True)

    out = tmp_path / "round_001"
    killed = 0
    for _attempt in range(3):
        process = subprocess.Popen(fedseg("aggregate", "--plans", str(plans_path), *updates, "-o", str(out), "-q"))
        # the moment a temporary output file exists, the process is writing: kill it there
        if kill_when(process, lambda: bool(temporaries(out))):
            killed += 1
            assert not (out / "aggregate.json").exists()   # an interrupted round never looks complete
            assert_outputs_whole(out)
        else:
            break
    assert killed >= 1
    done = subprocess.run(fedseg("aggregate", "--plans", str(plans_path), *updates, "-o", str(out), "-q"))
    assert done.returncode == 0
    assert (out / "aggregate.json").is_file()
    produced = {k: v for k, v in snapshot(out).items() if not k.startswith("updates/")}
    assert produced == snapshot(clean)
    # running it once more changes nothing (idempotent)
    subprocess.run(fedseg("aggregate", "--plans", str(plans_path), *updates, "-o", str(out), "-q"), check=True)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("updates/")} == produced


def _train_args(tiny_sites: Path, work: Path, state: Path, output: Path) -> list[str]:
    site = "site_a"
    return fedseg("train", "--site", site, "--data", str(tiny_sites / site), "--plans", str(work / "plans.json"),
                  "--weights", str(work / "round_000" / f"{site}.safetensors"), "--state", str(state),
                  "-o", str(output), "--iterations", "3", "--workers", "0", "-q")


@pytest.mark.slow
def test_train_killed_then_rerun_gives_the_clean_update(tiny_sites: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    fps = []
    for site in sorted(p.name for p in tiny_sites.iterdir()):
        fp = work / "fp" / f"{site}.json"
        subprocess.run(fedseg("fingerprint", "--site", site, "--data", str(tiny_sites / site), "-o", str(fp), "-q"), check=True)
        fps.append(str(fp))
    subprocess.run(fedseg("plan", *fps, "-o", str(work / "plans.json"), "-q"), check=True)
    subprocess.run(fedseg("init", "--plans", str(work / "plans.json"), "-o", str(work / "round_000"), "-q"), check=True)

    clean_update = work / "clean" / "site_a.safetensors"
    subprocess.run(_train_args(tiny_sites, work, work / "clean_state", clean_update), check=True)

    state, update = work / "state", work / "round_001" / "updates" / "site_a.safetensors"
    moments = [
        lambda: any((state / "preprocessed").rglob("*.npz")) if (state / "preprocessed").exists() else False,  # preprocessing
        lambda: (state / "checkpoint.safetensors").exists(),                                                 # training done
    ]
    for ready in moments:
        process = subprocess.Popen(_train_args(tiny_sites, work, state, update))
        if kill_when(process, ready, timeout=300):
            assert not update.exists() or read_weight_file(update)
    subprocess.run(_train_args(tiny_sites, work, state, update), check=True)
    assert update.read_bytes() == clean_update.read_bytes()
    # and once more: a finished round is not trained again, the same file comes out
    before = os.stat(state / "checkpoint.safetensors").st_mtime_ns
    subprocess.run(_train_args(tiny_sites, work, state, update), check=True)
    assert update.read_bytes() == clean_update.read_bytes()
    assert os.stat(state / "checkpoint.safetensors").st_mtime_ns >= before


def test_simulate_refuses_a_used_run_folder_without_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedseg.cli.main import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something.txt").write_text("x")
    rc = run(["simulate", str(tmp_path / "sites"), "-o", str(run_dir), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--resume" in err and str(run_dir) in err
    rc = run(["simulate", str(tmp_path / "sites"), "-o", str(run_dir), "--resume", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a fedseg run" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["something.txt"]

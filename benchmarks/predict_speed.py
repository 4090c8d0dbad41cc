"""Inference speed on CPU: `fedseg predict` vs `nnUNetv2_predict`, same network and volume.

Set-up (nnunet_peer.py): 10 training cases of ~64³ voxels, 2 channels, planned by both tools
(the same 3d_fullres patch, batch, spacing and 5-stage PlainConvUNet, checked), and one test
volume of ~96³ voxels (at the planned spacing). fedseg predicts with its round-0 model
(`fedseg init`); nnU-Net gets a model folder whose fold_0/checkpoint_final.pth is a network
built by nnU-Net's own trainer class holding the same weights (fedseg's tensors copied in by
name: `encoder.stages.S.convs...` is nnU-Net's `encoder.stages.S.0.convs...`; every nnU-Net
parameter must be matched). Both run the same network over the same sliding-window tiles
(step 0.5, Gaussian weighting), without test-time mirroring, on 2 CPU threads, including
reading, preprocessing (crop, normalisation, resampling), resampling back and writing the
label map; the two label maps are compared voxel by voxel.

    nice .venv/bin/python benchmarks/predict_speed.py --nnunet-venv /path/to/nnunet_venv [--precision fp32 bf16]

`--precision` runs `fedseg predict` once per precision (fedseg's `--precision`; bf16 is
bfloat16 autocast, fast on CPUs with AMX) and compares each one's labels with nnU-Net's and
with the first precision's; nnU-Net predicts in float32 on the CPU.

Each command runs REPEAT times as a subprocess (start-up included); the best is reported.
Runs by hand, about 4 minutes on 2 loaded cores once set up (the set-up takes about 1.5
minutes); ratio last.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Measured, load_average, run_measured  # noqa: E402
from nnunet_peer import DATASET, Peer, describe  # noqa: E402

TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"

# Run with nnU-Net's python: a checkpoint as nnU-Net's trainer writes it, holding fedseg's weights.
MAKE_CHECKPOINT = r"""
import json, re, sys
import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
plans_file, dataset_file, out, weights_file = sys.argv[1:5]
plans, dataset_json = json.load(open(plans_file)), json.load(open(dataset_file))
pm = PlansManager(plans)
cm = pm.get_configuration("3d_fullres")
torch.manual_seed(0)
net = nnUNetTrainer.build_network_architecture(
    pm, cm, determine_num_input_channels(pm, cm, dataset_json), pm.get_label_manager(dataset_json).num_segmentation_heads,
    enable_deep_supervision=True)
given = dict(np.load(weights_file))

def fedseg_name(name):
    name = name.replace("decoder.encoder.", "encoder.")
    name = name.replace("all_modules.0.", "conv.").replace("all_modules.1.", "norm.")
    return re.sub(r"^encoder\.stages\.(\d+)\.0\.", r"encoder.stages.\1.", name)

state = net.state_dict()
for name in state:
    source = given[fedseg_name(name)]
    assert tuple(source.shape) == tuple(state[name].shape), name
    state[name] = torch.from_numpy(source)
net.load_state_dict(state)
torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                          "device": torch.device("cpu")},
            "inference_allowed_mirroring_axes": (0, 1, 2), "optimizer_state": None, "grad_scaler_state": None,
            "logging": {}, "_best_ema": None, "current_epoch": 0}, out)
print(sum(p.numel() for p in net.parameters()))
"""


def nnunet_model_folder(peer: Peer, weights: Path) -> int:
    """nnU-Net's model folder holding fedseg's weights (`weights`, a fedseg weight file)."""
    import numpy as np

    from fedseg.federation.weightfile import read_weight_file

    folder = peer.results / DATASET / TRAINER_FOLDER
    exported = peer.work / "fedseg_weights.npz"
    np.savez(exported, **read_weight_file(weights)[0])
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    shutil.copy(peer.pre / "nnUNetPlans.json", folder / "plans.json")
    shutil.copy(peer.pre / "dataset.json", folder / "dataset.json")
    shutil.copy(peer.pre / "dataset_fingerprint.json", folder / "dataset_fingerprint.json")
    done = subprocess.run([str(peer.venv / "bin" / "python"), "-c", MAKE_CHECKPOINT, str(folder / "plans.json"),
                           str(folder / "dataset.json"), str(folder / "fold_0" / "checkpoint_final.pth"), str(exported)],
                          env=peer.env, check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1])


def best(runs: list[Measured]) -> Measured:
    return min(runs, key=lambda m: m.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-venv", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedseg_peer"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--weights", type=Path, default=None,
                        help="a fedseg model file of the peer plan (default: its round-0 model; a trained one, e.g. "
                             "`fedseg aggregate` of train_speed.py's update, makes the label comparison meaningful)")
    args = parser.parse_args()

    peer = Peer(args.work, args.nnunet_venv)
    peer.prepare(n_cases=10, size=64, test_size=96)
    config = peer.check_same_configuration()
    weights = args.weights or peer.fedseg / "round_000" / "models" / "global.safetensors"
    n_params = nnunet_model_folder(peer, weights)
    images = peer.raw / "imagesTs"
    print(f"{describe(config)}; {n_params / 1e6:.1f}M parameters; test volume {images}; load {load_average()}")

    out_nn = args.work / "pred_nnunet"
    commands = {"nnUNetv2_predict --disable_tta": ([
        str(peer.venv / "bin" / "nnUNetv2_predict"), "-i", str(images), "-o", str(out_nn), "-d", "2", "-c",
        "3d_fullres", "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu", "--disable_tta",
        "--disable_progress_bar"], out_nn)}
    for precision in args.precision:
        out = args.work / f"pred_fedseg_{precision}"
        commands[f"fedseg predict --precision {precision}"] = ([
            peer.fedseg_cli, "predict", "--plans", str(peer.plans_path), "--weights", str(weights), "-i", str(images),
            "-o", str(out), "--no-mirror", "--device", "cpu", "--precision", precision, "--quiet"], out)
    runs: dict[str, list[Measured]] = {name: [] for name in commands}
    env = {**peer.env}
    env.pop("OMP_NUM_THREADS")   # both use torch's default of one thread per core (2 here)
    env.pop("MKL_NUM_THREADS")
    for _ in range(args.repeat):   # interleaved, so a change in the machine's load hits both
        for name, (cmd, out) in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(run_measured(cmd, env=env))
    print(f"{'':<34} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12}   all wall s")
    for name, measured in runs.items():
        m = best(measured)
        print(f"{name:<34} {m.seconds:>7.2f} {m.cpu_seconds:>7.2f} {m.peak_rss_mb:>12.0f}   "
              + " ".join(f"{r.seconds:.2f}" for r in measured))
    print(f"load after: {load_average()}")
    names = list(commands)
    for name in names[1:]:
        print(f"{name} vs nnU-Net: {compare_labels(out_nn, commands[name][1])}")
        if name != names[1]:
            print(f"{name} vs {names[1]}: {compare_labels(commands[names[1]][1], commands[name][1])}")
    nn = best(runs[names[0]])
    for name in names[1:]:
        print(f"ratio: {name} is {nn.seconds / best(runs[name]).seconds:.2f}x as fast as nnUNetv2_predict (target >= 2.0)")


def compare_labels(out_nn: Path, out_fs: Path) -> str:
    """How many voxels of the two tools' label maps differ, per case."""
    import nibabel as nib
    import numpy as np

    parts = []
    for theirs in sorted(out_nn.glob("*.nii.gz")):
        a = np.asarray(nib.load(theirs).dataobj)
        b = np.asarray(nib.load(out_fs / theirs.name).dataobj)
        differ = int(np.count_nonzero(a != b)) if a.shape == b.shape else a.size
        parts.append(f"{theirs.name}: {differ} of {a.size} voxels differ, labels {sorted(np.unique(b).tolist())}")
    return "labels: " + "; ".join(parts)


if __name__ == "__main__":
    main()

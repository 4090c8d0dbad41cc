"""nnU-Net interoperability through the command line, without nnunetv2 installed.

A federation's round-0 model is exported as an nnU-Net trained-model folder, then adopted
back with `plan --from-nnunet` / `init --from-nnunet`: the tensors must come back
bit-identical, the files must carry what nnU-Net's own files carry (tests/fixtures/nnunet,
made by nnunetv2), and a checkpoint that is not plain data, or that is another
architecture, is refused with exit 2.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.cli.main import run
from fedseg.federation.nnunet_checkpoint import PREDICTOR_KEYS, load_checkpoint_dict
from fedseg.federation.weightfile import read_weight_file

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "nnunet"
TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"


class NotPlainData:
    """Stands for any pickled object: loading it would import and call code."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.fixture(scope="module")
def federation(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sites, planned and initialised (no training: round-0 weights are random and distinct)."""
    work = tmp_path_factory.mktemp("nnunet_interop")
    fps = []
    for site in ("site_a", "site_b"):
        fp = work / f"{site}.json"
        assert run(["fingerprint", "--site", site, "--data", str(tiny_sites / site), "-o", str(fp), "-q"]) == 0
        fps.append(str(fp))
    plans = work / "plans.json"
    assert run(["plan", *fps, "-o", str(plans), "-q"]) == 0
    assert run(["init", "--plans", str(plans), "-o", str(work / "round_000"), "-q"]) == 0
    results = work / "results"
    model = work / "round_000" / "models" / "global.safetensors"
    assert run(["export", "nnunet", "--plans", str(plans), "--weights", str(model), "--dataset", "Dataset042_Tiny",
                "-o", str(results), "-q"]) == 0
    return {"work": work, "fps": fps, "plans": plans, "model": model,
            "trainer": results / "Dataset042_Tiny" / TRAINER_DIR}


def _adopt(federation: dict[str, Path], trainer: Path, out: Path) -> tuple[int, int]:
    plans = out / "plans.json"
    rc_plan = run(["plan", *federation["fps"], "--from-nnunet", str(trainer), "-o", str(plans), "-q"])
    if rc_plan != 0:
        return rc_plan, -1
    return rc_plan, run(["init", "--plans", str(plans), "--from-nnunet", str(trainer), "-o", str(out / "round_000"), "-q"])


def test_export_then_import_gives_identical_tensors(federation: dict[str, Path], tmp_path: Path) -> None:
    assert _adopt(federation, federation["trainer"], tmp_path) == (0, 0)
    original, _ = read_weight_file(federation["model"])
    adopted, _ = read_weight_file(tmp_path / "round_000" / "models" / "global.safetensors")
    assert sorted(adopted) == sorted(original)
    for name, array in original.items():
        assert adopted[name].dtype == array.dtype and np.array_equal(adopted[name], array), name
    # the adopted plan holds the same configuration it was exported from
    before = json.loads(federation["plans"].read_text())
    after = json.loads((tmp_path / "plans.json").read_text())
    for key in ("spacing", "patch_size", "batch_size", "normalization_schemes", "use_mask_for_norm", "network"):
        assert after["configurations"]["3d_fullres"][key] == before["configurations"]["3d_fullres"][key], key
    assert after["extra"]["nnunet"]["trainer_folder"] == TRAINER_DIR


def test_exported_files_carry_what_nnunet_writes(federation: dict[str, Path]) -> None:
    trainer = federation["trainer"]
    ours_plans = json.loads((trainer / "plans.json").read_text())
    theirs_plans = json.loads((FIXTURE / "plans.json").read_text())
    assert set(theirs_plans) <= set(ours_plans)
    theirs_config = theirs_plans["configurations"]["3d_fullres"]
    ours_config = ours_plans["configurations"]["3d_fullres"]
    assert set(ours_config) == set(theirs_config)
    assert set(ours_config["architecture"]["arch_kwargs"]) == set(theirs_config["architecture"]["arch_kwargs"])
    for key in ("network_class_name", "_kw_requires_import"):
        assert ours_config["architecture"][key] == theirs_config["architecture"][key]
    for key in ("resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs",
                "resampling_fn_probabilities_kwargs", "preprocessor_name"):
        assert ours_config[key] == theirs_config[key], key
    assert ours_plans["transpose_forward"] == theirs_plans["transpose_forward"]
    assert ours_plans["image_reader_writer"] == theirs_plans["image_reader_writer"]  # both .nii.gz
    theirs_dataset = json.loads((FIXTURE / "dataset.json").read_text())
    ours_dataset = json.loads((trainer / "dataset.json").read_text())
    assert {"channel_names", "labels", "numTraining", "file_ending"} <= set(ours_dataset) & set(theirs_dataset)
    assert ours_dataset["numTraining"] == 16  # both sites' training cases
    theirs_fp = json.loads((FIXTURE / "dataset_fingerprint.json").read_text())
    ours_fp = json.loads((trainer / "dataset_fingerprint.json").read_text())
    assert set(ours_fp) == set(theirs_fp)
    assert len(ours_fp["spacings"]) == len(ours_fp["shapes_after_crop"]) == 16

    schema = json.loads((FIXTURE / "checkpoint_schema.json").read_text())
    checkpoint = load_checkpoint_dict(trainer / "fold_all" / "checkpoint_final.pth")
    for key in PREDICTOR_KEYS:
        assert type(checkpoint[key]).__name__ == schema["top_level"][key], key
    assert set(checkpoint["init_args"]) == set(schema["init_args"])
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert checkpoint["init_args"]["fold"] == schema["init_args_fold"]
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)
    # every alias nnU-Net's state dict has (strict loading), in nnU-Net's naming scheme
    names = set(checkpoint["network_weights"])
    fixture_names = set(schema["network_weights"])
    assert {n.split(".")[0] for n in names} == {n.split(".")[0] for n in fixture_names}
    assert any(".all_modules." in n for n in names) and any(n.startswith("decoder.encoder.") for n in names)


def _rewrite_checkpoint(federation: dict[str, Path], tmp_path: Path, change) -> Path:
    trainer = tmp_path / "Dataset042_Tiny" / TRAINER_DIR
    shutil.copytree(federation["trainer"], trainer)
    path = trainer / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return trainer


def test_checkpoint_with_a_pickled_object_is_refused(
    federation: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trainer = _rewrite_checkpoint(federation, tmp_path, lambda c: c.update(logging=NotPlainData()))
    rc_plan, rc_init = _adopt(federation, trainer, tmp_path / "adopt")
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert (rc_plan, rc_init) == (0, 2)
    assert "checkpoint_final.pth" in err[-1] and "other than tensors and plain values" in err[-1]
    assert "this ran while loading" not in captured.out
    assert not (tmp_path / "adopt" / "round_000").exists()


def test_other_architecture_is_refused_naming_the_parameter(
    federation: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    name = "decoder.seg_layers.1.weight"

    def three_classes(checkpoint: dict) -> None:
        weights = OrderedDict(checkpoint["network_weights"])
        weights[name] = torch.zeros((3, *weights[name].shape[1:]))
        checkpoint["network_weights"] = weights

    trainer = _rewrite_checkpoint(federation, tmp_path, three_classes)
    rc_plan, rc_init = _adopt(federation, trainer, tmp_path / "adopt")
    err = capsys.readouterr().err.strip()
    assert (rc_plan, rc_init) == (0, 2)
    assert name in err and "[3, 32, 1, 1, 1]" in err and len(err.splitlines()) == 1


def test_export_help_has_an_example(capsys: pytest.CaptureFixture) -> None:
    assert run(["export", "nnunet", "--help"]) == 0
    assert "Example" in capsys.readouterr().out


def test_asymfedavg_exports_the_sites_network_with_its_local_tensors(
    federation: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fedseg.federation.site_update import split_site_state
    from fedseg.training.site_state import save_local_state
    from fedseg.federation.weightfile import WeightMeta, write_weight_file
    from fedseg.planning.plans import load_plans

    plans_path = tmp_path / "plans.json"
    assert run(["plan", *federation["fps"], "--strategy", "asymfedavg", "--set", "local_norms=true",
                "-o", str(plans_path), "-q"]) == 0
    assert run(["init", "--plans", str(plans_path), "-o", str(tmp_path / "round_000"), "-q"]) == 0
    plans = load_plans(plans_path)
    full, _ = read_weight_file(tmp_path / "round_000" / "site_b.safetensors")
    # what site_b holds after a round: the shared tensors come from the coordinator, the rest
    # (here every norm) lives only in its state folder
    shared, local = split_site_state(plans, "site_b", full)
    assert local and shared
    incoming = tmp_path / "round_001" / "site_b.safetensors"
    write_weight_file(incoming, shared, WeightMeta(
        kind="model", plan_id=plans.plan_id, strategy="asymfedavg", site="site_b", round=1,
        n_cases=8, n_iterations=0, scopes={}, extra={}))
    save_local_state(tmp_path / "state_b", {k: torch.from_numpy(v) for k, v in local.items()})

    out = tmp_path / "results"
    base = ["export", "nnunet", "--plans", str(plans_path), "--weights", str(incoming), "-o", str(out), "-q"]
    assert run(base) == 2
    assert "--state" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*.pth"))
    assert run([*base, "--site", "site_b", "--state", str(tmp_path / "state_b")]) == 0
    [trainer] = (out / "Dataset999_fedseg").iterdir()
    assert trainer.name == TRAINER_DIR  # site_b's own configuration, under nnU-Net's name
    from fedseg.federation.nnunet_checkpoint import read_checkpoint

    exported = read_checkpoint(trainer / "fold_all" / "checkpoint_final.pth").weights
    assert set(exported) == set(full)
    assert all(np.array_equal(exported[k], full[k]) for k in full)
    nn_plans = json.loads((trainer / "plans.json").read_text())
    site_config = plans.configuration_for("site_b")
    assert nn_plans["configurations"]["3d_fullres"]["patch_size"] == site_config.patch_size


def test_strategies_without_nnunets_network_are_refused(federation: dict[str, Path]) -> None:
    import dataclasses

    from fedseg.errors import InputError
    from fedseg.federation.nnunet_export import require_unet
    from fedseg.planning.plans import StrategySpec, load_plans

    plans = dataclasses.replace(load_plans(federation["plans"]), strategy=StrategySpec("fedsam", {}))
    with pytest.raises(InputError, match="fedsam.*not nnU-Net's U-Net"):
        require_unet(plans, "site_a")


def test_bad_dataset_name_and_missing_fold_are_exit_2(
    federation: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "results"
    rc = run(["export", "nnunet", "--plans", str(federation["plans"]), "--weights", str(federation["model"]),
              "--dataset", "Dataset42_Tiny", "-o", str(out), "-q"])
    assert rc == 2 and "Dataset42_Tiny" in capsys.readouterr().err and not out.exists()
    plans = tmp_path / "plans.json"
    assert run(["plan", *federation["fps"], "--from-nnunet", str(federation["trainer"]), "-o", str(plans), "-q"]) == 0
    rc = run(["init", "--plans", str(plans), "--from-nnunet", str(federation["trainer"]), "--fold", "3",
              "-o", str(tmp_path / "round_000"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "fold_3" in err and "not found" in err
    assert not (tmp_path / "round_000").exists()

"""Name and plan conversion between fedseg and nnU-Net v2, checked against files nnunetv2 wrote.

tests/fixtures/nnunet holds nnU-Net's plans.json, dataset.json, dataset_fingerprint.json
and the structure of a checkpoint it trained (benchmarks/nnunet_interop.py --write-fixture).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.errors import InputError
from fedseg.federation.nnunet_checkpoint import PREDICTOR_KEYS, load_checkpoint_dict, read_checkpoint, write_checkpoint
from fedseg.federation.nnunet_names import from_nnunet_state, to_nnunet_state
from fedseg.federation.nnunet_plans import configuration_from_nnunet, nnunet_configuration
from fedseg.training.network import initial_state

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "nnunet"
SOURCE = FIXTURE / "plans.json"


@pytest.fixture(scope="module")
def nnunet_plans() -> dict:
    return json.loads(SOURCE.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((FIXTURE / "checkpoint_schema.json").read_text())


@pytest.fixture(scope="module")
def state(nnunet_plans: dict) -> dict[str, np.ndarray]:
    config = configuration_from_nnunet(nnunet_plans, "3d_fullres", SOURCE)
    return {k: v.numpy() for k, v in initial_state(config, n_channels=1, n_classes=2, seed=0).items()}


def test_fedseg_network_under_nnunet_names_is_nnunets_state_dict(state: dict, schema: dict) -> None:
    exported = to_nnunet_state(state)
    assert {name: list(a.shape) for name, a in exported.items()} == schema["network_weights"]


def test_names_round_trip_is_identity(state: dict) -> None:
    back = from_nnunet_state(to_nnunet_state(state), "x.pth")
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)


def test_alias_with_other_values_is_refused(state: dict) -> None:
    weights = dict(to_nnunet_state(state))
    alias = "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight"
    weights[alias] = weights[alias] + 1
    with pytest.raises(InputError, match="all_modules.0.weight' differs"):
        from_nnunet_state(weights, "x.pth")


def test_unknown_parameter_is_refused(state: dict) -> None:
    weights = {**to_nnunet_state(state), "encoder.stages.0.0.blocks.0.conv1.conv.weight": np.zeros(1, np.float32)}
    with pytest.raises(InputError, match="blocks.0.conv1"):
        from_nnunet_state(weights, "x.pth")


def test_configuration_round_trip_reproduces_nnunets_entry(nnunet_plans: dict) -> None:
    theirs = nnunet_plans["configurations"]["3d_fullres"]
    ours = nnunet_configuration(configuration_from_nnunet(nnunet_plans, "3d_fullres", SOURCE))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        if key != "batch_dice":  # only nnU-Net's training loss reads it
            assert ours[key] == theirs[key], key


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["architecture"]["arch_kwargs"].update(dropout_op="torch.nn.Dropout3d"), "no dropout"),
        (lambda c: c["architecture"].update(network_class_name="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"), "ResidualEncoderUNet"),
        (lambda c: c["architecture"]["arch_kwargs"].update(conv_bias=False), "conv_bias"),
        (lambda c: c.update(normalization_schemes=["SomeOtherNormalization"]), "SomeOtherNormalization"),
    ],
)
def test_configurations_fedseg_cannot_build_are_refused(nnunet_plans: dict, edit, message: str) -> None:
    plans = copy.deepcopy(nnunet_plans)
    edit(plans["configurations"]["3d_fullres"])
    with pytest.raises(InputError, match=message):
        configuration_from_nnunet(plans, "3d_fullres", SOURCE)


def test_inherited_configuration_is_resolved(nnunet_plans: dict) -> None:
    plans = copy.deepcopy(nnunet_plans)
    plans["configurations"]["3d_big"] = {"inherits_from": "3d_fullres", "batch_size": 7}
    config = configuration_from_nnunet(plans, "3d_big", SOURCE)
    assert config.batch_size == 7 and config.patch_size == nnunet_plans["configurations"]["3d_fullres"]["patch_size"]


def test_checkpoint_written_holds_what_nnunets_predictor_reads(state: dict, schema: dict, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    init_args = {"plans": {}, "configuration": "3d_fullres", "fold": "all", "dataset_json": {}, "device": torch.device("cpu")}
    write_checkpoint(path, state, init_args=init_args, trainer_name="nnUNetTrainer", mirror_axes=(0, 1, 2))
    raw = load_checkpoint_dict(path)
    assert {k: type(raw[k]).__name__ for k in PREDICTOR_KEYS} == {k: schema["top_level"][k] for k in PREDICTOR_KEYS}
    assert set(raw["init_args"]) == set(schema["init_args"])
    back = read_checkpoint(path)
    assert back.trainer_name == "nnUNetTrainer" and back.configuration == "3d_fullres" and back.mirror_axes == (0, 1, 2)
    assert all(np.array_equal(back.weights[k], state[k]) for k in state) and set(back.weights) == set(state)


def test_numpy_scalars_in_logs_are_read_but_objects_are_not(state: dict, tmp_path: Path) -> None:
    # nnU-Net's own checkpoints log numpy floats: plain values, accepted
    path = tmp_path / "nnunet_like.pth"
    weights = {k: torch.from_numpy(v) for k, v in to_nnunet_state(state).items()}
    torch.save({"network_weights": weights, "logging": {"ema_fg_dice": [np.float64(0.5)]}, "_best_ema": np.float32(0.5)}, path)
    assert set(read_checkpoint(path).weights) == set(state)
    # any other class (here a harmless one) would be imported and called by a plain unpickler
    bad = tmp_path / "bad.pth"
    torch.save({"network_weights": weights, "logging": argparse.Namespace(lr=0.01)}, bad)
    with pytest.raises(InputError, match="other than tensors and plain values"):
        read_checkpoint(bad)


def test_not_a_checkpoint_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(b"not a zip or pickle")
    with pytest.raises(InputError, match="checkpoint_final.pth"):
        read_checkpoint(path)

"""Local training: it learns, resumes after a crash, and a finished round is not trained twice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedseg.synth import generate
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec, TrainingSpec
from fedseg.training.network import build_network, initial_state
from fedseg.training.trainer import (
    CHECKPOINT_FILE,
    OPTIMIZER_FILE,
    SiteTrainer,
    TrainOutcome,
    foreground_dice,
    poly_lr,
    predict_indices,
    train_local,
)

ITERATIONS = 12


def tiny_plans(n_stages: int = 3, features=(8, 16, 32), patch=(16, 16, 16), iterations: int = ITERATIONS) -> Plans:
    ndim = len(patch)
    config = ConfigurationPlan(
        name="3d_fullres",
        spacing=[1.5, 1.0, 1.0],
        patch_size=list(patch),
        median_image_size_in_voxels=[20.0, 28.0, 28.0],
        batch_size=2,
        normalization_schemes=["ZScoreNormalization"],
        use_mask_for_norm=[False],
        network=NetworkSpec(
            n_stages=n_stages,
            features_per_stage=list(features[:n_stages]),
            kernel_sizes=[[3] * ndim] * n_stages,
            strides=[[1] * ndim] + [[2] * ndim] * (n_stages - 1),
            n_conv_per_stage=[2] * n_stages,
            n_conv_per_stage_decoder=[2] * (n_stages - 1),
        ),
    )
    return Plans(
        dataset_name="tiny",
        channel_names={"0": "MRI"},
        labels={"background": 0, "lesion": 1},
        file_ending=".nii.gz",
        fingerprint={},
        sites={s: SiteInfo("MRI", ["MRI"], 8) for s in ("site_a", "site_b", "site_c")},
        strategy=StrategySpec("fedavg"),
        configurations={"3d_fullres": config},
        default_configuration="3d_fullres",
        training=TrainingSpec(rounds=2, iterations_per_round=iterations, initial_lr=1e-2),
        seed=0,
    )


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions run fastest on one thread, and a shared CI core makes more threads
    spin against each other; the thread count is the caller's choice, so the tests make it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def site_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, preset="tiny", seed=0)
    return out / "site_a"


def _start(plans: Plans, seed: int = 0):
    config = plans.configuration_for("site_a")
    return build_network(config, 1, 2, seed=seed), initial_state(config, 1, 2, seed=seed)


def test_training_decreases_loss_and_writes_state(site_root, tmp_path):
    plans = tiny_plans(n_stages=2, features=(16, 32), iterations=30)
    net, init = _start(plans)
    outcome = train_local(plans, "site_a", site_root, tmp_path, net, init, 1, num_workers=0)
    assert isinstance(outcome, TrainOutcome)
    assert outcome.n_iterations == 30 and len(outcome.history) == 30
    losses = [row["loss"] for row in outcome.history]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.2
    assert 0.0 <= outcome.val_dice <= 1.0
    assert outcome.mean_loss == pytest.approx(np.mean(losses))
    assert outcome.data_wait_s >= 0 and outcome.train_s > outcome.data_wait_s
    assert set(outcome.state_dict) == set(init) and all(t.device.type == "cpu" for t in outcome.state_dict.values())
    assert not torch.equal(outcome.state_dict["encoder.stages.0.convs.0.conv.weight"], init["encoder.stages.0.convs.0.conv.weight"])
    # poly LR over the federation: round 1 of 2 ends near half way
    assert outcome.history[0]["lr"] == pytest.approx(1e-2)
    assert outcome.history[-1]["lr"] == pytest.approx(poly_lr(1e-2, 29, 60))
    # cache, momentum and checkpoint in the state folder
    assert len(list((tmp_path / "preprocessed" / plans.plan_id[:16]).glob("*.npz"))) == 8
    with safe_open(str(tmp_path / OPTIMIZER_FILE), "pt") as f:
        assert set(f.keys()) == set(init)   # 2 stages: one output, so every parameter is trained
        assert f.metadata()["after_round"] == "1"
    with safe_open(str(tmp_path / CHECKPOINT_FILE), "pt") as f:
        assert f.metadata()["finished"] == "true"


class CrashingTrainer(SiteTrainer):
    checkpoint_every = 4
    crash_at = 6
    seen: list[float] = []

    def train_step(self, batch):
        if len(CrashingTrainer.seen) == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        loss = super().train_step(batch)
        CrashingTrainer.seen.append(loss)
        return loss


def test_resume_after_crash_continues_from_checkpoint(site_root, tmp_path):
    plans = tiny_plans()
    net, init = _start(plans)
    CrashingTrainer.seen = []
    with pytest.raises(KeyboardInterrupt):
        train_local(plans, "site_a", site_root, tmp_path, net, init, 1, num_workers=0, trainer_class=CrashingTrainer)
    with safe_open(str(tmp_path / CHECKPOINT_FILE), "pt") as f:
        assert f.metadata()["iteration"] == "4" and f.metadata()["finished"] == "false"
    net2, _ = _start(plans, seed=99)   # a fresh process would build a fresh network
    messages: list[str] = []
    advanced: list[int] = []
    outcome = train_local(
        plans, "site_a", site_root, tmp_path, net2, init, 1, num_workers=0, log=messages.append,
        progress=lambda n=1, info="": advanced.append(n),
    )
    assert sum(advanced) == ITERATIONS and advanced[0] == 4
    assert outcome.resumed_from == 4
    assert outcome.n_iterations == ITERATIONS and len(outcome.history) == ITERATIONS
    assert [r["loss"] for r in outcome.history[:4]] == pytest.approx(CrashingTrainer.seen[:4])
    assert any("resuming" in m for m in messages)


def test_finished_round_is_returned_without_training(site_root, tmp_path, monkeypatch):
    plans = tiny_plans()
    net, init = _start(plans)
    first = train_local(plans, "site_a", site_root, tmp_path, net, init, 1, num_workers=0)

    def boom(*args, **kwargs):
        raise AssertionError("must not train or load data again")

    monkeypatch.setattr(SiteTrainer, "train_step", boom)
    monkeypatch.setattr(SiteTrainer, "prepare_data", boom)
    again = train_local(plans, "site_a", site_root, tmp_path, _start(plans, seed=5)[0], init, 1, num_workers=0)
    assert again.from_checkpoint
    assert again.n_iterations == first.n_iterations
    assert again.mean_loss == first.mean_loss
    assert again.val_dice == first.val_dice or (math.isnan(again.val_dice) and math.isnan(first.val_dice))
    assert again.history == first.history
    assert all(torch.equal(again.state_dict[k], first.state_dict[k]) for k in first.state_dict)
    # another initial state is another round: it trains
    monkeypatch.undo()
    other = train_local(plans, "site_a", site_root, tmp_path, net, first.state_dict, 1, iterations=2, num_workers=0)
    assert not other.from_checkpoint and other.n_iterations == 2


def test_training_is_deterministic_and_round_two_uses_momentum(site_root, tmp_path):
    plans = tiny_plans(iterations=4)
    outcomes = []
    for run in ("a", "b"):
        net, init = _start(plans)
        outcomes.append(train_local(plans, "site_a", site_root, tmp_path / run, net, init, 1, num_workers=0))
    a, b = outcomes
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    # round 2 starts from the saved momentum
    trainer = SiteTrainer(plans, "site_a", _start(plans)[0], num_workers=0)
    trainer._load_previous_momentum(tmp_path / "a" / OPTIMIZER_FILE, 2)
    with safe_open(str(tmp_path / "a" / OPTIMIZER_FILE), "pt") as f:
        saved = set(f.keys())
    # every trained parameter has momentum; the lowest-resolution head (deep supervision weight 0) gets no gradient
    assert set(trainer.momentum_buffers()) == saved == set(a.state_dict) - {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}
    r2 = train_local(plans, "site_a", site_root, tmp_path / "a", _start(plans)[0], a.state_dict, 2, num_workers=0)
    assert r2.history[0]["lr"] == pytest.approx(poly_lr(1e-2, 4, 8))


def test_background_workers_in_training(site_root, tmp_path):
    plans = tiny_plans(iterations=3)
    net, init = _start(plans)
    outcome = train_local(plans, "site_a", site_root, tmp_path, net, init, 1, num_workers=2)
    assert outcome.n_iterations == 3 and math.isfinite(outcome.mean_loss)


def test_split_and_helpers():
    assert poly_lr(0.01, 0, 100) == 0.01 and poly_lr(0.01, 100, 100) == 0.0
    ref = np.zeros((4, 4, 4), dtype=np.int16)
    ref[1:3, 1:3, 1:3] = 1
    assert foreground_dice([ref], [ref], 2) == 1.0
    assert math.isnan(foreground_dice([np.zeros_like(ref)], [np.zeros_like(ref)], 2))


def test_predict_indices_covers_cases_larger_and_smaller_than_the_patch():
    plans = tiny_plans()
    net = build_network(plans.configuration_for("site_a"), 1, 2, seed=0).eval()
    net.deep_supervision = False
    for shape in ((1, 10, 12, 9), (1, 20, 33, 17)):
        pred = predict_indices(net, np.random.default_rng(0).normal(size=shape).astype(np.float32), [16, 16, 16], "cpu")
        assert pred.shape == shape[1:] and pred.dtype == np.int16


def test_2d_configuration_trains_on_slices(site_root, tmp_path):
    plans = tiny_plans(patch=(24, 24), iterations=3)
    config = plans.configurations["3d_fullres"]
    config.name, config.spacing = "2d", [1.0, 1.0]
    plans.configurations = {"2d": config}
    plans.default_configuration = "2d"
    net, init = build_network(config, 1, 2, seed=0), initial_state(config, 1, 2, seed=0)
    outcome = train_local(plans, "site_a", site_root, tmp_path, net, init, 1, num_workers=0)
    assert outcome.n_iterations == 3 and math.isfinite(outcome.mean_loss)
    assert 0.0 <= outcome.val_dice <= 1.0


def test_fold_split_and_incoming_model_dice(site_root, tmp_path):
    """The round trains on its fold's cases, writes splits_final.json, and scores the model it
    started from on the fold's validation cases before the first step."""
    import json

    plans = tiny_plans(iterations=2)
    net, init = _start(plans)
    trainer = SiteTrainer(plans, "site_a", net, num_workers=0)
    trainer.fold = 1
    outcome = trainer.run_round(tmp_path, init, 1, dataset_root=site_root)
    splits = json.loads((tmp_path / "splits_final.json").read_text())
    assert len(splits) == plans.training.n_folds
    assert sorted(c.case_id for c in trainer.val_cases) == splits[1]["val"]
    assert sorted(c.case_id for c in trainer.train_cases) == splits[1]["train"]
    assert outcome.n_val_cases == len(splits[1]["val"])
    fresh, _ = _start(plans)
    fresh.load_state_dict(init)
    scorer = SiteTrainer(plans, "site_a", fresh, num_workers=0)
    scorer.val_cases, scorer.train_cases = trainer.val_cases, trainer.train_cases
    assert outcome.incoming_val_dice == pytest.approx(scorer.validate())
    again = SiteTrainer(plans, "site_a", _start(plans)[0], num_workers=0)
    again.fold = 1
    returned = again.run_round(tmp_path, init, 1, dataset_root=site_root)
    assert returned.from_checkpoint and returned.incoming_val_dice == outcome.incoming_val_dice

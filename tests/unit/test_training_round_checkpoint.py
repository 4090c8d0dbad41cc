"""The round checkpoint files: a checkpoint belongs to one round of one plan, site, fold and
initial state; damaged files count as absent; momentum says which round wrote it."""

from __future__ import annotations

import math

import torch

from fedseg.training.round_checkpoint import (
    checkpoint_identity,
    read_momentum,
    read_round_checkpoint,
    save_round_momentum,
    state_sha256,
    write_round_checkpoint,
)


def _identity(round_index: int = 1, fold: int | str = 0) -> dict[str, str]:
    return checkpoint_identity("plan", "site_a", round_index, 4, state_sha256({"w": torch.ones(2)}), fold)


def test_a_checkpoint_reads_back_for_its_own_round_only(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    model, momentum = {"w": torch.arange(3.0)}, {"w": torch.full((3,), 0.5)}
    state = {"loss_sum": 1.5, "history": [{"iteration": 1}], "val_dice": float("nan")}
    write_round_checkpoint(path, _identity(), model, momentum, state, done=2, finished=False)

    saved = read_round_checkpoint(path, _identity())
    assert saved is not None and not saved.finished and saved.iteration == 2
    assert torch.equal(saved.model["w"], model["w"]) and torch.equal(saved.momentum["w"], momentum["w"])
    assert saved.state["loss_sum"] == 1.5 and math.isnan(saved.state["val_dice"])   # NaN survives
    assert read_round_checkpoint(path, _identity(round_index=2)) is None
    assert read_round_checkpoint(path, _identity(fold="all")) is None


def test_damaged_or_missing_files_count_as_absent(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    assert read_round_checkpoint(path, _identity()) is None and read_momentum(path) is None
    path.write_bytes(b"not a safetensors file")
    assert read_round_checkpoint(path, _identity()) is None and read_momentum(path) is None


def test_momentum_says_which_round_wrote_it(tmp_path):
    path = tmp_path / "optimizer.safetensors"
    save_round_momentum(path, {"w": torch.zeros(2)}, round_index=3, site="site_a")
    tensors, after = read_momentum(path)
    assert after == 3 and torch.equal(tensors["w"], torch.zeros(2))


def test_the_state_hash_sees_values_names_and_dtypes():
    base = state_sha256({"w": torch.zeros(2)})
    assert base == state_sha256({"w": torch.zeros(2)})
    assert base != state_sha256({"w": torch.ones(2)})
    assert base != state_sha256({"v": torch.zeros(2)})
    assert base != state_sha256({"w": torch.zeros(2, dtype=torch.float64)})


def test_names_stay_importable_from_their_former_modules():
    from fedseg.training import inference, sam, trainer

    for name in ("SiteTrainer", "TrainOutcome", "train_local", "poly_lr", "foreground_dice", "predict_indices",
                 "CHECKPOINT_FILE", "OPTIMIZER_FILE", "CachedCase", "load_training_cases"):
        assert hasattr(trainer, name), name
    for name in ("build_sam_segmenter", "sam_config", "SAM_CONFIGS", "is_frozen_backbone", "SamSegmenter",
                 "load_sam_weights", "read_checkpoint", "Adapter"):
        assert hasattr(sam, name), name
    for name in ("predict_folder", "predict_folder_ensemble", "EnsembleMember", "check_ensemble", "ensemble_probabilities",
                 "probabilities_to_labels", "predict_case_probabilities", "sliding_window_probabilities",
                 "compute_steps_for_sliding_window", "gaussian_importance_map", "inference_mode"):
        assert hasattr(inference, name), name

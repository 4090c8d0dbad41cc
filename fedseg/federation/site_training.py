"""One site's part of a round: load what the coordinator sent, train locally, write the update.

The model a site trains = its local-only parameters (kept in its state folder) completed by
the tensors of the incoming model file; round 0's files hold every tensor. After training, parameters whose scope is a pool go into the update file; the rest
(scope None) go back into the state folder and never leave the site.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError
from fedseg.federation.privacy import site_privacy
from fedseg.federation.round_commit import check_committed
from fedseg.federation.secure_aggregation import AgreementKey
from fedseg.federation.signing import SigningKey, require_signing_key
from fedseg.training.site_state import load_local_state, save_local_state
from fedseg.federation.site_update import compose_site_state, split_site_state, write_site_update
from fedseg.federation.strategies import get_strategy
from fedseg.federation.weightfile import open_weight_file, sha256_file
from fedseg.folder_lock import folder_lock
from fedseg.planning.plans import Plans
from fedseg.training.recipes.registry import get_recipe
from fedseg.training.trainer import train_local

STARTED_FROM = "started_from"          # update metadata: sha256 of the model file the round started from
# Points of the loss / learning-rate curve a site reports in its update (`extra["curve"]`):
# enough to draw a round's training in `fedseg report`, small enough for the file's header.
CURVE_POINTS = 32


@dataclass
class SiteRoundResult:
    site: str
    round: int
    update_path: str
    n_iterations: int
    n_shared_tensors: int
    n_local_tensors: int
    val_dice: float
    mean_loss: float
    seconds: float
    fold: int | str = 0
    incoming_val_dice: float = float("nan")   # validation Dice of the model the round started from
    n_val_cases: int = 0


def incoming_round(plans: Plans, weights_path: Path) -> int:
    """Round of the model file a site starts from (its checks happen in compose_site_state)."""
    with open_weight_file(weights_path) as reader:
        return reader.meta.round


def site_network_and_state(plans: Plans, site: str, weights_path: Path, state_dir: Path | None):
    """The site's network and its full starting state: incoming model file + local-only tensors."""
    check_committed(weights_path)   # a file of a round folder counts only when its commit record lists it
    network = get_recipe(get_strategy(plans.strategy.name).recipe).network(plans, site)
    local = load_local_state(state_dir) if state_dir is not None else {}
    arrays = compose_site_state(plans, site, weights_path, local)
    # compose_site_state returns arrays the caller owns (copies of the file's tensors, the
    # local state as loaded): share them with torch instead of copying the model once more
    state = {name: torch.from_numpy(np.require(array, requirements=["C", "W"])) for name, array in arrays.items()}
    return network, state


def run_site_round(
    plans: Plans,
    site: str,
    dataset_root: Path,
    weights_path: Path,
    state_dir: Path,
    output: Path,
    iterations: int | None = None,
    device: str = "cpu",
    num_workers: int = 2,
    progress: Callable | None = None,
    log: Callable[[str], None] | None = None,
    signing_key: SigningKey | None = None,
    agreement_key: AgreementKey | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    fold: int | str = 0,
    precision: str = "auto",
) -> SiteRoundResult:
    """Train `site` for one round starting from `weights_path`; write the update to `output`.

    `signing_key`: the site's private key; required when the plan lists public keys (the
    update then gets `<output>.sig`, and the incoming model must carry the coordinator's).
    Checked before training, so a site never trains a round it cannot sign.
    `agreement_key`: the site's key-agreement key; required when the plan uses secure aggregation.
    `fold`: the cross-validation fold of the site's splits (fedseg.training.folds). The update
    reports the fold's validation Dice of the incoming model and how many cases it rests on
    (numbers only), from which the coordinator picks the best round. `precision`: auto, fp32, bf16.
    """
    start = time.monotonic()
    plans.site(site)
    strategy = get_strategy(plans.strategy.name)
    strategy.check_params(plans.strategy.params)   # what plan, init and aggregate refuse, a site refuses too
    signing_key = require_signing_key(plans.keys, signing_key, site)
    round_index = _round_to_train(plans, weights_path)
    with folder_lock(state_dir, "site state folder"):
        network, state = site_network_and_state(plans, site, weights_path, state_dir)
        started_from = sha256_file(weights_path)
        # the starting point of the update (DP clips the delta from it) and the key, checked before training
        privacy = site_privacy(plans, site, split_site_state(plans, site, state)[0], agreement_key)
        outcome = train_local(
            plans, site, Path(dataset_root), Path(state_dir), network, state, round_index,
            iterations=iterations, device=device, num_workers=num_workers, progress=progress, log=log,
            trainer_class=get_recipe(strategy.recipe).trainer_class(plans), max_voxels=max_voxels, fold=fold,
            precision=precision)
        meta = write_site_update(
            plans, site, outcome.state_dict, output, round_index=round_index, n_iterations=outcome.n_iterations,
            extra=_update_extra(outcome, started_from, fold), signing_key=signing_key, privacy=privacy,
        )
        _shared, local = split_site_state(plans, site, outcome.state_dict)
        # Local parameters last: the trainer recognises a finished round by the hash of its
        # starting state, which includes the previous round's local parameters. Killed between
        # the two writes, a re-run starts from the same state, returns the finished round and
        # writes both files again.
        save_local_state(state_dir, {k: outcome.state_dict[k] for k in local})
    return SiteRoundResult(
        site=site, round=round_index, update_path=str(output), n_iterations=outcome.n_iterations,
        n_shared_tensors=len(meta.scopes), n_local_tensors=len(local), val_dice=outcome.val_dice,
        mean_loss=outcome.mean_loss, seconds=time.monotonic() - start, fold=fold,
        incoming_val_dice=outcome.incoming_val_dice, n_val_cases=outcome.n_val_cases,
    )


def _round_to_train(plans: Plans, weights_path: Path) -> int:
    """The round a site trains from `weights_path`: the file's round + 1, within the plan's rounds."""
    previous_round = incoming_round(plans, weights_path)
    if previous_round + 1 > plans.training.rounds:
        raise InputError(
            f"is the model of round {previous_round}; the plan has {plans.training.rounds} rounds, so nothing is left to train",
            weights_path,
        )
    return previous_round + 1


def _update_extra(outcome, started_from: str, fold: int | str) -> dict:
    """The numbers an update reports besides its tensors (no case names, no voxels)."""
    return {
        "val_dice": _finite_or_none(outcome.val_dice), "mean_loss": _finite_or_none(outcome.mean_loss),
        # sha256 of the model file this update started from: links the round to the one before
        STARTED_FROM: started_from,
        "curve": training_curve(outcome.history),
        "fold": fold, "incoming_val_dice": _finite_or_none(outcome.incoming_val_dice),
        "n_val_cases": outcome.n_val_cases,
    }


def load_site_model(plans: Plans, site: str, weights_path: Path, state_dir: Path | None):
    """The network a site would use for prediction: weights file + its local parameters."""
    network, state = site_network_and_state(plans, site, weights_path, state_dir)
    network.load_state_dict(state)
    return network


def training_curve(history: list[dict], max_points: int = CURVE_POINTS) -> dict[str, list]:
    """The round's training loss and learning rate, binned to at most `max_points` points:
    {"iteration": last iteration of each bin, "loss": mean loss over the bin, "lr": lr at its start}.
    Empty lists when the trainer kept no history."""
    rows = [row for row in history if "loss" in row and "lr" in row]
    n_bins = min(max_points, len(rows))
    curve: dict[str, list] = {"iteration": [], "loss": [], "lr": []}
    for chunk in np.array_split(np.arange(len(rows)), n_bins) if n_bins else []:
        losses = [float(rows[i]["loss"]) for i in chunk]
        curve["iteration"].append(int(rows[chunk[-1]].get("iteration", chunk[-1] + 1)))
        curve["loss"].append(_finite_or_none(float(np.mean(losses))))
        curve["lr"].append(float(rows[chunk[0]]["lr"]))
    return curve


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None

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

from fedseg.errors import InputError
from fedseg.federation.signing import SigningKey, require_signing_key
from fedseg.planning.plans import Plans

LOCAL_STATE_FILE = "local.safetensors"


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
    from fedseg.federation.weightfile import open_weight_file

    with open_weight_file(weights_path) as reader:
        return reader.meta.round


def site_network_and_state(plans: Plans, site: str, weights_path: Path, state_dir: Path | None):
    """The site's network and its full starting state: incoming model file + local-only tensors."""
    import torch

    from fedseg.federation.engine import compose_site_state
    from fedseg.federation.strategies import get_strategy

    network = get_strategy(plans.strategy.name).network(plans, site)
    local = load_local_state(state_dir) if state_dir is not None else {}
    arrays = compose_site_state(plans, site, weights_path, local)
    state = {name: torch.from_numpy(np.array(array, copy=True)) for name, array in arrays.items()}
    return network, state


def load_local_state(state_dir: Path) -> dict:
    from safetensors.torch import load_file

    path = Path(state_dir) / LOCAL_STATE_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(f"cannot read local state ({exc})", path) from None


def save_local_state(state_dir: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    from fedseg.atomic import atomic_path

    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(state_dir) / LOCAL_STATE_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


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
    fold: int | str = 0,
) -> SiteRoundResult:
    """Train `site` for one round starting from `weights_path`; write the update to `output`.

    `signing_key`: the site's private key; required when the plan lists public keys (the
    update then gets `<output>.sig`, and the incoming model must carry the coordinator's).
    Checked before training, so a site never trains a round it cannot sign.
    `fold`: the cross-validation fold of the site's splits (fedseg.training.folds). The update
    reports the fold's validation Dice of the incoming model and how many cases it rests on
    (numbers only), from which the coordinator picks the best round.
    """
    from fedseg.federation.engine import split_site_state, write_site_update
    from fedseg.training.trainer import train_local

    start = time.monotonic()
    plans.site(site)
    signing_key = require_signing_key(plans.keys, signing_key, site)
    previous_round = incoming_round(plans, weights_path)
    round_index = previous_round + 1
    if round_index > plans.training.rounds:
        raise InputError(
            f"is the model of round {previous_round}; the plan has {plans.training.rounds} rounds, so nothing is left to train",
            weights_path,
        )
    from fedseg.federation.strategies import get_strategy

    network, state = site_network_and_state(plans, site, weights_path, state_dir)
    outcome = train_local(
        plans, site, Path(dataset_root), Path(state_dir), network, state, round_index,
        iterations=iterations, device=device, num_workers=num_workers, progress=progress, log=log,
        trainer_class=get_strategy(plans.strategy.name).trainer_class(plans), fold=fold,
    )
    meta = write_site_update(
        plans, site, outcome.state_dict, output, round_index=round_index, n_iterations=outcome.n_iterations,
        extra={
            "val_dice": _finite_or_none(outcome.val_dice), "mean_loss": _finite_or_none(outcome.mean_loss),
            "fold": fold, "incoming_val_dice": _finite_or_none(outcome.incoming_val_dice),
            "n_val_cases": outcome.n_val_cases,
        },
        signing_key=signing_key,
    )
    _shared, local = split_site_state(plans, site, outcome.state_dict)
    # Local parameters last: the trainer recognises a finished round by the hash of its
    # starting state, which includes the previous round's local parameters. Killed between
    # the two writes, a re-run starts from the same state, returns the finished round and
    # writes both files again.
    save_local_state(state_dir, {k: outcome.state_dict[k] for k in local})
    return SiteRoundResult(
        site=site,
        round=round_index,
        update_path=str(output),
        n_iterations=outcome.n_iterations,
        n_shared_tensors=len(meta.scopes),
        n_local_tensors=len(local),
        val_dice=outcome.val_dice,
        mean_loss=outcome.mean_loss,
        seconds=time.monotonic() - start,
        fold=fold,
        incoming_val_dice=outcome.incoming_val_dice,
        n_val_cases=outcome.n_val_cases,
    )


def load_site_model(plans: Plans, site: str, weights_path: Path, state_dir: Path | None):
    """The network a site would use for prediction: weights file + its local parameters."""
    network, state = site_network_and_state(plans, site, weights_path, state_dir)
    network.load_state_dict(state)
    return network


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None

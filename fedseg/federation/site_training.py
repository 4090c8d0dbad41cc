"""One site's part of a round: load what the coordinator sent, train locally, write the update.

The model a site trains = the network's seeded initial weights, overlaid with the tensors of
the incoming weight file, overlaid with the site's local-only parameters kept in its state
folder. After training, parameters whose scope is a pool go into the update file; the rest
(scope None) go back into the state folder and never leave the site.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.errors import InputError
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


def load_incoming(plans: Plans, site: str, weights_path: Path) -> tuple[dict[str, np.ndarray], int]:
    """Read and check the weight file a site starts its round from; returns tensors and its round."""
    from fedseg.federation.weightfile import read_weight_file

    tensors, meta = read_weight_file(weights_path)
    if meta.plan_id != plans.plan_id:
        raise InputError(f"made under another plan (plan_id {meta.plan_id[:12]}, this plan {plans.plan_id[:12]})", weights_path)
    if meta.kind != "model":
        raise InputError(f"is a {meta.kind!r} file; train starts from a model file (round_r/<site>.safetensors)", weights_path)
    if meta.site in plans.sites and meta.site != site:
        raise InputError(f"is the model for site {meta.site!r}, not {site!r}", weights_path)
    return tensors, meta.round


def site_state_dict(plans: Plans, site: str, incoming: dict[str, np.ndarray], state_dir: Path):
    """Full state dict for `site`: seeded init <- incoming tensors <- local-only tensors."""
    import torch

    from fedseg.federation.strategies import get_strategy

    strategy = get_strategy(plans.strategy.name)
    torch.manual_seed(plans.seed)
    network = strategy.network(plans, site)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    for name, array in incoming.items():
        if name not in state:
            raise InputError(f"tensor {name!r} is not a parameter of site {site}'s network")
        state[name] = torch.from_numpy(np.ascontiguousarray(array)).to(state[name].dtype)
    local = load_local_state(state_dir)
    for name, tensor in local.items():
        if name in state:
            state[name] = tensor
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


def split_by_scope(plans: Plans, site: str, state: dict) -> tuple[dict, dict, dict[str, str]]:
    """(shared tensors, local tensors, scopes of the shared ones). Integer buffers stay local."""
    from fedseg.federation.strategies import get_strategy

    strategy = get_strategy(plans.strategy.name)
    shared, local, scopes = {}, {}, {}
    for name, tensor in state.items():
        scope = strategy.scope(plans, site, name)
        if scope is None or not tensor.is_floating_point():
            local[name] = tensor
        else:
            shared[name] = tensor
            scopes[name] = scope
    return shared, local, scopes


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
) -> SiteRoundResult:
    """Train `site` for one round starting from `weights_path`; write the update to `output`."""
    from fedseg.federation.weightfile import WeightMeta, write_weight_file
    from fedseg.training.trainer import train_local

    start = time.monotonic()
    plans.site(site)
    incoming, previous_round = load_incoming(plans, site, weights_path)
    round_index = previous_round + 1
    if round_index > plans.training.rounds:
        raise InputError(
            f"is the model of round {previous_round}; the plan has {plans.training.rounds} rounds, so nothing is left to train",
            weights_path,
        )
    network, state = site_state_dict(plans, site, incoming, state_dir)
    outcome = train_local(
        plans,
        site,
        Path(dataset_root),
        Path(state_dir),
        network,
        state,
        round_index,
        iterations=iterations,
        device=device,
        num_workers=num_workers,
        progress=progress,
        log=log,
    )
    shared, local, scopes = split_by_scope(plans, site, outcome.state_dict)
    # Local parameters first: if we are killed before the update is written, a re-run
    # resumes from the trainer's finished checkpoint and writes both again.
    save_local_state(state_dir, local)
    meta = WeightMeta(
        kind="update",
        plan_id=plans.plan_id,
        strategy=plans.strategy.name,
        site=site,
        round=round_index,
        n_cases=plans.sites[site].n_cases,
        n_iterations=outcome.n_iterations,
        scopes=scopes,
        extra={"val_dice": _finite_or_none(outcome.val_dice), "mean_loss": _finite_or_none(outcome.mean_loss)},
    )
    write_weight_file(output, {k: v.detach().cpu().numpy() for k, v in shared.items()}, meta)
    return SiteRoundResult(
        site=site,
        round=round_index,
        update_path=str(output),
        n_iterations=outcome.n_iterations,
        n_shared_tensors=len(shared),
        n_local_tensors=len(local),
        val_dice=outcome.val_dice,
        mean_loss=outcome.mean_loss,
        seconds=time.monotonic() - start,
    )


def load_site_model(plans: Plans, site: str, weights_path: Path, state_dir: Path | None):
    """The network a site would use for prediction: weights file + its local parameters."""
    incoming, _ = load_incoming(plans, site, weights_path)
    network, state = site_state_dict(plans, site, incoming, state_dir or Path("/nonexistent"))
    network.load_state_dict(state)
    return network


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None

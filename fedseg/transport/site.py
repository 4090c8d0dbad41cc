"""The site's side of a Flower federation: answer the coordinator's three requests.

Each request arrives with plain data (plans.json text, a weight bundle) and is answered with
plain data; `fedseg.transport.apps` wraps these functions in a Flower ClientApp. Everything a
site keeps between requests lives in its state folder, as in `fedseg train --state`:

    <state>/fingerprint.json             the site's fingerprint (computed once)
    <state>/flower/plans.json            the plan of the current run
    <state>/flower/round_<r-1>.safetensors  the model the coordinator sent for round r (+ .sig)
    <state>/flower/updates/round_<r>.safetensors  the update sent back (+ .sig)
    <state>/local.safetensors, checkpoint...  what `run_site_round` keeps (never sent)

So a ClientApp process can be restarted between rounds, and a coordinator that asks again for
a round the site finished gets the same update back (the trainer's checkpoint makes a repeated
round return at once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.atomic import write_text_atomic
from fedseg.data.dataset import load_dataset
from fedseg.errors import InputError
from fedseg.federation.signing import load_signing_key
from fedseg.federation.site_evaluation import evaluate_site
from fedseg.federation.site_training import run_site_round
from fedseg.planning.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint
from fedseg.planning.plans import load_plans
from fedseg.training.evaluation import to_jsonable
from fedseg.transport.payload import read_weight_bundle, write_weight_bundle

FLOWER_DIR = "flower"


@dataclass
class SiteSettings:
    """Who this site is and where its data and state live (one per SuperNode)."""

    site: str
    data: Path                      # the site's nnU-Net raw folder
    state: Path                     # the site's state folder (fedseg train --state)
    key: Path | None = None         # the site's private key, when the plan requires signatures
    device: str = "cpu"
    precision: str = "auto"         # the network's arithmetic: auto, fp32 or bf16 (fedseg.training.device)
    workers: int = 2                # background augmentation workers
    plan_id: str | None = None      # when set, refuse to train under any other plan


@dataclass
class TrainReply:
    update: dict[str, bytes]        # the update file (+ signature) as payload.read_weight_bundle gives it
    round: int
    val_dice: float | None
    seconds: float


def site_hello(settings: SiteSettings) -> dict[str, Any]:
    """The site's name and fingerprint (summaries only, no voxel values), computed once."""
    path = Path(settings.state) / "fingerprint.json"
    if not path.is_file():
        save_fingerprint(compute_fingerprint(load_dataset(settings.data), settings.site), path)
    return {"site": settings.site, "fingerprint": load_fingerprint(path)}


def _accept_plans(settings: SiteSettings, plans_json: str):
    """Store and load the run's plan (load_plans checks that plan_id matches the content)."""
    path = Path(settings.state) / FLOWER_DIR / "plans.json"
    if not path.is_file() or path.read_text() != plans_json:
        write_text_atomic(path, plans_json)
    plans = load_plans(path)
    if settings.plan_id is not None and plans.plan_id != settings.plan_id:
        raise InputError(
            f"the coordinator sent plan {plans.plan_id[:12]}…, this site only trains under plan {settings.plan_id[:12]}…", path
        )
    plans.site(settings.site)
    return plans


def _signing_key(settings: SiteSettings):
    if settings.key is None:
        return None
    return load_signing_key(settings.key)


def site_train(
    settings: SiteSettings, plans_json: str, model: dict[str, bytes], round_index: int, iterations: int | None
) -> TrainReply:
    """Train round `round_index` from the model the coordinator sent; return the update bundle."""
    plans = _accept_plans(settings, plans_json)
    folder = Path(settings.state) / FLOWER_DIR
    model_path = write_weight_bundle(model, folder / f"round_{round_index - 1:03d}.safetensors", "the coordinator")
    output = folder / "updates" / f"round_{round_index:03d}.safetensors"
    result = run_site_round(
        plans, settings.site, Path(settings.data), model_path, Path(settings.state), output,
        iterations=iterations, device=settings.device, num_workers=settings.workers,
        signing_key=_signing_key(settings), precision=settings.precision,
    )
    if result.round != round_index:
        raise InputError(f"the coordinator asked for round {round_index} but sent the model of round {result.round - 1}", model_path)
    val_dice = result.val_dice if result.val_dice == result.val_dice else None   # NaN -> None
    return TrainReply(read_weight_bundle(output), result.round, val_dice, result.seconds)


def site_evaluate(settings: SiteSettings, plans_json: str, model: dict[str, bytes], round_index: int) -> dict | None:
    """Predict the site's test split with the final model; the metrics (no images) or None."""
    plans = _accept_plans(settings, plans_json)
    folder = Path(settings.state) / FLOWER_DIR
    model_path = write_weight_bundle(model, folder / f"final_round_{round_index:03d}.safetensors", "the coordinator")
    result = evaluate_site(
        plans, settings.site, Path(settings.data), model_path, Path(settings.state), folder / "predictions",
        device=settings.device, precision=settings.precision,
    )
    # through JSON, as it travels: NaN (an empty label) becomes null
    return None if result is None else json.loads(json.dumps(to_jsonable(result), allow_nan=False))

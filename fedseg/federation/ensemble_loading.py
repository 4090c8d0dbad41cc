"""The models `fedseg predict` runs: one weight file, several (an ensemble), the folds of
run folders at a checkpoint, or an inference plan written by `fedseg find-best`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.errors import InputError
from fedseg.federation.checkpoints import site_model_file
from fedseg.federation.model_selection import load_inference_plan
from fedseg.federation.site_training import load_site_model
from fedseg.planning.plans import load_plans
from fedseg.training.inference import EnsembleMember, check_ensemble
from fedseg.training.postprocessing import PostprocessingDecision


@dataclass
class ModelSource:
    """Where predict's models come from (exactly one of the three ways)."""

    weights: list[Path] = field(default_factory=list)   # with plans_path: weight files of one plan
    plans_path: Path | None = None
    runs: list[Path] = field(default_factory=list)      # run folders, each with its plans.json
    checkpoint: str = "final"
    inference_plan: Path | None = None


def load_members(source: ModelSource, site: str | None, state: Path | None):
    """(ensemble members, the post-processing decision of an inference plan or None).

    `site`: whose network and model file to use (default: the plan's first site).
    `state`: the site's state folder for parameters that never left it; with run folders
    the simulate layout `RUN/state/<site>` is used when it exists.
    """
    given = sum(bool(x) for x in (source.weights, source.runs, source.inference_plan))
    if given != 1:
        raise InputError("give the models one way: --weights (with --plans), --run, or --inference-plan")
    postprocessing = None
    entries: list[tuple[Path, Path, Path | None]] = []     # (plans file, weight file, state folder)
    if source.weights:
        if source.plans_path is None:
            raise InputError("--weights needs --plans")
        entries = [(source.plans_path, w, state) for w in source.weights]
    else:
        runs, checkpoint = list(source.runs), source.checkpoint
        if source.inference_plan is not None:
            plan = load_inference_plan(source.inference_plan)
            base = Path(source.inference_plan).parent
            runs = [base / m["run"] for m in plan["models"]]
            checkpoint = plan.get("checkpoint", checkpoint)
            postprocessing = PostprocessingDecision.from_dict(plan.get("postprocessing") or {})
        for run in runs:
            plans = load_plans(Path(run) / "plans.json")
            name = site or sorted(plans.sites)[0]
            run_state = state if state is not None else Path(run) / "state" / name
            entries.append((Path(run) / "plans.json", site_model_file(Path(run), checkpoint, name),
                            run_state if run_state.is_dir() else None))
    return _build(entries, site), postprocessing


def _build(entries: Sequence[tuple[Path, Path, Path | None]], site: str | None):
    members = []
    for plans_path, weights, state in entries:
        plans = load_plans(plans_path)
        name = site or sorted(plans.sites)[0]
        plans.site(name)
        if not Path(weights).is_file():
            raise InputError("weights file not found", weights)
        network = load_site_model(plans, name, Path(weights), state)
        members.append(EnsembleMember(network, plans, plans.configuration_for(name), name))
    check_ensemble(members)
    return members

"""`fedseg validate` at a site: cross-validation scores of every candidate model, numbers only.

For each fold k the site predicts its fold-k validation cases (its own splits_final.json)
with fold k's model of every configuration run, and scores each configuration alone and
each pair's ensemble (mean softmax, nnU-Net's find_best_configuration candidates), with and
without the connected-component post-processing steps. The file it writes holds Dice sums,
case counts, label names and configuration names: no case name, voxel or prediction, so it
may be sent to the coordinator (`fedseg find-best`).

Layout of a configuration run (what `fedseg simulate --folds` writes):
`RUN/fold_<k>/plans.json`, `RUN/fold_<k>/<checkpoint round>/<site>.safetensors`, and the
site's state folder (splits, local parameters) `RUN/fold_<k>/state/<site>/` unless
`state_template` says otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.data.case_loading import load_case
from fedseg.data.dataset import load_dataset
from fedseg.errors import InputError
from fedseg.federation.checkpoints import site_model_file
from fedseg.federation.site_training import load_site_model
from fedseg.planning.plans import load_plans
from fedseg.training.folds import FOLD_ALL, SPLITS_FILE, fold_cases, fold_name, load_or_create_splits
from fedseg.training.inference import EnsembleMember, ensemble_probabilities, probabilities_to_labels
from fedseg.training.postprocessing import DiceSums

VALIDATION_FORMAT = "fedseg-validation/1"
DEFAULT_STATE_TEMPLATE = "{run}/fold_{fold}/state/{site}"
ENSEMBLE_SEPARATOR = "+"


@dataclass
class ConfigurationRun:
    """One configuration's cross-validation: a folder of fold_<k>/ run folders."""

    name: str          # the plan's configuration name (3d_fullres, 2d, ...)
    root: Path


def candidate_names(configurations: Sequence[str]) -> dict[str, list[str]]:
    """Each configuration alone, then every pair as an ensemble (nnU-Net's candidates)."""
    names = sorted(configurations)
    out = {name: [name] for name in names}
    for pair in itertools.combinations(names, 2):
        out[ENSEMBLE_SEPARATOR.join(pair)] = list(pair)
    return out


def configuration_runs(roots: Sequence[Path], fold: int | str) -> list[ConfigurationRun]:
    """Name each run folder by the configuration its plan trains; two runs of one name are refused."""
    runs: dict[str, ConfigurationRun] = {}
    for root in roots:
        plans_path = Path(root) / fold_name(fold) / "plans.json"
        if not plans_path.is_file():
            raise InputError(f"not a cross-validation run folder (no {fold_name(fold)}/plans.json)", root)
        name = load_plans(plans_path).default_configuration
        if name in runs:
            raise InputError(f"trains configuration {name!r} like {runs[name].root}; give one run per configuration", root)
        runs[name] = ConfigurationRun(name, Path(root))
    return list(runs.values())


def validate_site(
    site: str,
    dataset_root: Path,
    run_roots: Sequence[Path],
    folds: Sequence[int | str],
    checkpoint: str = "final",
    state_template: str = DEFAULT_STATE_TEMPLATE,
    device: str = "cpu",
    mirror: bool = False,
    progress: Callable[..., None] | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Score every candidate on the site's validation cases of `folds`; returns the file's content
    (`precision`: the networks' arithmetic, auto, fp32 or bf16)."""
    if not folds:
        raise InputError("give at least one fold (--fold)")
    if FOLD_ALL in folds:
        raise InputError("fold 'all' trained on every case, so it has no held-out case to validate on")
    dataset = load_dataset(dataset_root)
    cases = {c.case_id: c for c in dataset.cases("Tr")}
    runs = configuration_runs(run_roots, folds[0])
    candidates = candidate_names([r.name for r in runs])
    scores = {name: DiceSums() for name in candidates}
    plan_ids: dict[str, str] = {}
    labels: dict[str, int] | None = None
    for fold in folds:
        members, split, labels = _fold_members(runs, fold, folds[0], site, cases, checkpoint, state_template, plan_ids, labels)
        _train, val_ids = fold_cases(split, fold, list(cases))
        for case_id in val_ids:
            case_data = load_case(cases[case_id], sorted(labels.values()))
            probs = {name: ensemble_probabilities([m], case_data, device=device, mirror=mirror, precision=precision)
                     for name, m in members.items()}
            for candidate, parts in candidates.items():
                mean = sum(probs[p] for p in parts) / len(parts)
                scores[candidate].add_case(probabilities_to_labels(mean, members[parts[0]].plans), case_data.seg, labels)
            if progress is not None:
                progress(1, info=f"fold {fold}")
    return {
        "format": VALIDATION_FORMAT,
        "site": site,
        "checkpoint": checkpoint,
        "folds": [str(f) for f in folds],
        "labels": labels,
        "configurations": dict(sorted(plan_ids.items())),
        "candidates": {
            name: {"members": parts, **scores[name].to_dict()} for name, parts in candidates.items()
        },
    }


def _fold_members(
    runs: Sequence[ConfigurationRun], fold: int | str, first_fold: int | str, site: str, cases: dict[str, Any],
    checkpoint: str, state_template: str, plan_ids: dict[str, str], labels: dict[str, int] | None,
) -> tuple[dict[str, EnsembleMember], Any, dict[str, int] | None]:
    """Fold `fold`'s model of every configuration run at the site, the split they all used and the
    labels (those of the first plan read); `plan_ids` collects each run's plan, which every fold
    of a run must share."""
    members: dict[str, EnsembleMember] = {}
    splits_seen: dict[str, Any] = {}
    for run in runs:
        run_dir = run.root / fold_name(fold)
        plans = load_plans(run_dir / "plans.json")
        if plans.default_configuration != run.name:
            raise InputError(f"trains {plans.default_configuration!r}, fold {first_fold} of this run trains {run.name!r}", run_dir)
        if run.name in plan_ids and plan_ids[run.name] != plans.plan_id:
            raise InputError("holds another plan than the run's other folds", run_dir / "plans.json")
        plan_ids[run.name] = plans.plan_id
        labels = labels or dict(plans.labels)
        state_dir = Path(state_template.format(run=run.root, fold=fold, site=site))
        if not (state_dir / SPLITS_FILE).is_file():
            raise InputError(f"no {SPLITS_FILE}: the site's state folder of this fold is elsewhere (--state-template)", state_dir)
        splits_seen[run.name] = load_or_create_splits(state_dir, list(cases), plans.training.n_folds, plans.seed, site)
        network = load_site_model(plans, site, site_model_file(run_dir, checkpoint, site), state_dir if state_dir.is_dir() else None)
        members[run.name] = EnsembleMember(network, plans, plans.configuration_for(site), site)
    if len({repr(s) for s in splits_seen.values()}) > 1:
        raise InputError(
            f"the configuration runs split the site's cases differently ({SPLITS_FILE} of fold {fold} differs); "
            "their validation predictions cannot be ensembled"
        )
    return members, next(iter(splits_seen.values())), labels

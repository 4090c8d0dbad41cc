"""`fedseg find-best` at the coordinator: nnU-Net's find_best_configuration from sites' numbers.

Inputs: the configuration runs (folders of fold_<k>/ runs) and one validation file per site
(`fedseg validate`: Dice sums and case counts, nothing else). The sites' sums are added,
so every validation case weighs the same whichever site holds it (case-weighted mean);
the candidate with the highest foreground mean Dice wins (nnU-Net's criterion: the mean over
labels of each label's mean Dice over cases; ties go to the single configuration, then
name order). Post-processing is then decided for the winner (fedseg.training.postprocessing).

Output: an inference plan (JSON): the models (each fold of each chosen configuration, at the
chosen checkpoint), the post-processing decision, every candidate's score, and the command
that predicts with it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseg.errors import InputError
from fedseg.federation.site_validation import VALIDATION_FORMAT, candidate_names, configuration_runs
from fedseg.planning.plans import load_plans
from fedseg.training.folds import fold_name
from fedseg.training.postprocessing import DiceSums, decide_postprocessing

INFERENCE_PLAN_FORMAT = "fedseg-inference-plan/1"


def load_validation_file(path: Path) -> dict[str, Any]:
    record = _read_json(Path(path), "validation file")
    if not isinstance(record, dict) or record.get("format") != VALIDATION_FORMAT:
        raise InputError(f"not a fedseg validation file (format {VALIDATION_FORMAT} expected)", path)
    try:
        record["scores"] = {name: DiceSums.from_dict(c) for name, c in record["candidates"].items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"malformed candidate scores ({type(exc).__name__}: {exc})", path) from None
    return record


def find_best(
    run_roots: Sequence[Path], validation_files: Sequence[Path], plan_dir: Path, allow_ensembles: bool = True
) -> dict[str, Any]:
    """Merge the sites' validation files and choose; returns the inference plan to be written
    into `plan_dir` (its model paths are relative to that folder)."""
    if not validation_files:
        raise InputError("give the sites' validation files (-m FILE, one per site)")
    records = [load_validation_file(p) for p in validation_files]
    first = records[0]
    folds = first["folds"]
    runs = configuration_runs(run_roots, folds[0])
    plan_ids = {r.name: load_plans(r.root / fold_name(folds[0]) / "plans.json").plan_id for r in runs}
    sites = _check_records(records, validation_files, plan_ids)
    candidates = candidate_names(plan_ids)
    if not allow_ensembles:
        candidates = {name: parts for name, parts in candidates.items() if len(parts) == 1}
    merged = {name: DiceSums() for name in candidates}
    for record in records:
        for name in candidates:
            merged[name].merge(record["scores"][name])
    table = {
        name: {"members": parts, "n_cases": merged[name].n_cases, "foreground_mean_dice": _none_if_nan(merged[name].foreground_mean()),
               "per_label_dice": {label: _none_if_nan(merged[name].label_mean(label, "none")) for label in merged[name].sums}}
        for name, parts in candidates.items()
    }
    ranked = sorted(candidates, key=lambda n: (-_score(merged[n].foreground_mean()), len(candidates[n]), n))
    chosen = ranked[0]
    labels = {str(k): int(v) for k, v in first["labels"].items()}
    decision, evidence = decide_postprocessing(merged[chosen], labels)
    by_name = {r.name: r for r in runs}
    models = [
        {"configuration": name, "fold": str(fold),
         "run": os.path.relpath(Path(by_name[name].root / fold_name(fold)).resolve(), Path(plan_dir).resolve()),
         "checkpoint": first["checkpoint"]}
        for name in candidates[chosen] for fold in folds
    ]
    return {
        "format": INFERENCE_PLAN_FORMAT,
        "chosen": chosen,
        "members": candidates[chosen],
        "models": models,
        "postprocessing": decision.to_dict(),
        "postprocessing_evidence": evidence,
        "candidates": table,
        "sites": sorted(sites),
        "folds": folds,
        "checkpoint": first["checkpoint"],
        "labels": labels,
    }


def _check_records(records: list[dict[str, Any]], paths: Sequence[Path], plan_ids: dict[str, str]) -> set[str]:
    """The sites of the validation files, refusing a site twice or a file made from other runs,
    folds, checkpoint or labels than the first."""
    first, first_path = records[0], Path(paths[0])
    sites: set[str] = set()
    for record, path in zip(records, paths):
        if record["site"] in sites:
            raise InputError(f"a second validation file of site {record['site']!r}", path)
        sites.add(record["site"])
        if record["configurations"] != plan_ids:
            raise InputError(
                f"scores configurations {record['configurations']} but the runs given are {plan_ids} "
                "(validate with the same runs)", path,
            )
        if (record["folds"], record["checkpoint"], record["labels"]) != (first["folds"], first["checkpoint"], first["labels"]):
            raise InputError(f"was made with other folds, checkpoint or labels than {first_path}", path)
    return sites


def predict_command(plan_path: Path) -> str:
    return f"fedseg predict --inference-plan {plan_path} -i INPUT_FOLDER -o OUTPUT_FOLDER"


def load_inference_plan(path: Path) -> dict[str, Any]:
    plan = _read_json(Path(path), "inference plan")
    if not isinstance(plan, dict) or plan.get("format") != INFERENCE_PLAN_FORMAT or not plan.get("models"):
        raise InputError(f"not a fedseg inference plan (format {INFERENCE_PLAN_FORMAT} with models expected)", path)
    return plan


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", path) from None


def _score(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)

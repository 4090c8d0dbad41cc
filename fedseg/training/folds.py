"""Per-site k-fold cross-validation splits, in nnU-Net's `splits_final.json` layout.

Each site splits its own training cases; the file lives in the site's state folder and its
case names never leave the site. The layout is nnU-Net's: a list with one entry per fold,
`[{"train": [case, ...], "val": [case, ...]}, ...]`, so a split made for nnU-Net can be
dropped in (an existing file is used as it is, as nnU-Net does, after checking that its
cases are the site's).

Fold `"all"` trains on every case and validates on the training cases (nnU-Net's `all`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedseg.atomic import write_json_atomic
from fedseg.errors import InputError
from fedseg.training.site_state import SPLITS_FILE

FOLD_ALL = "all"

Fold = int | str   # 0..n_folds-1, or FOLD_ALL


def parse_fold(raw: str | int, n_folds: int | None = None) -> Fold:
    """`"3"` -> 3, `"all"` -> "all"; an InputError for anything else (or a fold >= n_folds)."""
    if isinstance(raw, str) and raw.strip().lower() == FOLD_ALL:
        return FOLD_ALL
    try:
        fold = int(raw)
    except (TypeError, ValueError):
        raise InputError(f"fold must be an integer or 'all', not {raw!r}") from None
    if fold < 0 or (n_folds is not None and fold >= n_folds):
        limit = f"0..{n_folds - 1}" if n_folds is not None else "a non-negative integer"
        raise InputError(f"fold {fold} does not exist (the plan has {n_folds} folds: {limit} or 'all')")
    return fold


def fold_name(fold: Fold) -> str:
    """Folder name of a fold's run, as nnU-Net names its fold folders: fold_0, ..., fold_all."""
    return f"fold_{fold}"


def make_splits(case_ids: Sequence[str], n_folds: int, seed: int, site: str) -> list[dict[str, list[str]]]:
    """k folds over the sorted case ids, shuffled by a seed derived from the plan seed and site.

    Like nnU-Net's KFold(shuffle=True): every case is validated in exactly one fold, fold
    sizes differ by at most one. A site with fewer cases than folds (a small site in a
    federation of larger ones) gets folds without validation cases; such a fold trains on
    every case and the trainer validates on its training cases.
    """
    ids = sorted(case_ids)
    if n_folds < 2:
        raise InputError(f"training.n_folds must be at least 2, not {n_folds}")
    if len(ids) < 2:
        # one case cannot be split: every fold trains on it (and validates on it, as a
        # fold without validation cases does)
        return [{"train": ids, "val": []} for _ in range(n_folds)]
    digest = hashlib.sha256(f"{seed}:{site}:folds".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:4], "little"))
    order = [ids[i] for i in rng.permutation(len(ids))]
    chunks = np.array_split(np.arange(len(ids)), n_folds)
    splits = []
    for chunk in chunks:
        val = sorted(order[i] for i in chunk)
        splits.append({"train": sorted(set(ids) - set(val)), "val": val})
    return splits


def load_or_create_splits(
    state_dir: Path, case_ids: Sequence[str], n_folds: int, seed: int, site: str
) -> list[dict[str, list[str]]]:
    """The site's splits: `STATE/splits_final.json` if present (checked), else made and written."""
    path = Path(state_dir) / SPLITS_FILE
    if not path.is_file():
        splits = make_splits(case_ids, n_folds, seed, site)
        write_json_atomic(path, splits)
        return splits
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", path) from None
    if not isinstance(splits, list) or not all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in splits
    ):
        raise InputError('not a splits file: expected [{"train": [...], "val": [...]}, ...]', path)
    known = set(case_ids)
    for index, fold in enumerate(splits):
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            raise InputError(f"fold {index} names case(s) the dataset does not have: {', '.join(unknown[:3])}", path)
        if not fold["train"]:
            raise InputError(f"fold {index} has no training case", path)
    return splits


def fold_cases(splits: Sequence[dict[str, list[str]]], fold: Fold, case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, val) case ids of `fold`; fold "all" trains and validates on every case."""
    if fold == FOLD_ALL:
        ids = sorted(case_ids)
        return ids, ids
    if not 0 <= int(fold) < len(splits):
        raise InputError(f"fold {fold} does not exist (the splits have {len(splits)} folds)")
    entry = splits[int(fold)]
    return sorted(entry["train"]), sorted(entry["val"])

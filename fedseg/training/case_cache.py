"""The site's training cases, preprocessed once and cached in its state folder.

    preprocessed/<plan_id[:16]>/<case>.npz + <case>.json   cached preprocessed training cases

A case counts as cached only when both files exist (the json is written last, atomically), so
a run killed while preprocessing redoes just the case it was on. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.atomic import atomic_path, write_json_atomic
from fedseg.data.case_loading import check_case_sizes, load_case
from fedseg.data.channels import expand_to_plan, plan_channel_list, site_channel_indices
from fedseg.data.dataset import load_dataset
from fedseg.data.image_header import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError
from fedseg.planning.plans import ConfigurationPlan, Plans
from fedseg.training.json_values import jsonable
from fedseg.training import site_state
from fedseg.training.preprocessing import preprocess_case


@dataclass
class CachedCase:
    """A preprocessed training case as the loader and validation use it."""

    case_id: str
    data: np.ndarray          # (C, z, y, x) float32
    seg: np.ndarray           # (1, z, y, x) int16 class indices, -1 outside the nonzero region
    properties: dict


def cache_dir(plans: Plans, state_dir: Path) -> Path:
    return site_state.cache_dir(plans.plan_id, state_dir)


def site_layout(plans: Plans, dataset: Any, dataset_json: Path) -> list[int] | None:
    """Plan index of each of the dataset's channels (None: the plan's own layout).

    A site of a mix-modal plan holds a subset of the plan's channels (matched by name);
    otherwise the dataset must have the plan's number of channels.
    """
    try:
        return site_channel_indices(plan_channel_list(plans.channel_names), plan_channel_list(dataset.channel_names))
    except InputError as exc:
        raise InputError(f"dataset has {dataset.n_channels} channel(s), the plan expects {plans.n_channels} ({exc.detail})",
                         dataset_json) from None


def load_training_cases(
    plans: Plans,
    site: str,
    dataset_root: Path,
    state_dir: Path,
    log: Callable[[str], None] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> list[CachedCase]:
    """The site's training cases, preprocessed per its configuration (cached in the state folder).

    Every file's header is checked against `max_voxels` before the first case is read."""
    dataset = load_dataset(dataset_root)
    layout = site_layout(plans, dataset, Path(dataset_root) / "dataset.json")
    config = plans.configuration_for(site)
    folder = cache_dir(plans, state_dir)
    cases = []
    site_cases = dataset.cases("Tr")
    check_case_sizes(site_cases, max_voxels)
    for case in site_cases:
        npz, meta = folder / f"{case.case_id}.npz", folder / f"{case.case_id}.json"
        if npz.is_file() and meta.is_file():
            with np.load(npz, allow_pickle=False) as arrays:
                data, seg = arrays["data"], arrays["seg"]
            properties = json.loads(meta.read_text())
        else:
            data, seg, properties = _preprocess_into_cache(case, plans, config, layout, npz, meta, max_voxels)
            if log:
                log(f"preprocessed {case.case_id} -> shape {list(data.shape[1:])}")
        cases.append(CachedCase(case.case_id, data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False), properties))
    return cases


def _preprocess_into_cache(
    case: Any, plans: Plans, config: ConfigurationPlan, layout: list[int] | None, npz: Path, meta: Path, max_voxels: int,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load and preprocess one case and write it to the cache: (data, seg, properties)."""
    case_data = load_case(case, plans.label_values, max_voxels=max_voxels)
    if layout is not None:   # a mix-modal site: its channels in the plan's order, absent ones zero
        case_data = dataclasses.replace(case_data, data=expand_to_plan(case_data.data, layout, plans.n_channels))
    pre = preprocess_case(case_data, plans, config)
    data, seg, properties = pre.data, pre.seg, jsonable(pre.properties)
    with atomic_path(npz) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, data=data, seg=seg)
    # the json is written last: a case counts as cached only when both files exist
    write_json_atomic(meta, properties)
    return data, seg, properties

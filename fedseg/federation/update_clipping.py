"""clip_norm: each update's delta from the model its site started from, measured and shortened.

One streaming pass per update (and its previous model), a block at a time, before any
arithmetic on the pools; the combiner then reads each clipped tensor lazily
(fedseg.federation.robust.ClippedTensor), so memory stays O(model) over all sites.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedseg.errors import InputError
from fedseg.federation.manifest import expected_parameters
from fedseg.federation.robust import ClippedTensor, RobustSpec, clip_factor, delta_sumsq
from fedseg.federation.round_commit import check_committed
from fedseg.federation.signing import COORDINATOR, verify_signature
from fedseg.federation.validation import ValidatedUpdate
from fedseg.federation.weightfile import WeightFileReader, check_declared_tensors, open_reader

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.planning.plans import Plans


@dataclass
class Clip:
    previous: WeightFileReader      # the model the site started the round from
    delta_norm: float
    factor: float


def previous_round_dir(out_dir: Path, round_index: int) -> Path:
    """Where the models of round r-1 live by default: `round_<r-1>` beside the round folder."""
    return Path(out_dir).parent / f"round_{round_index - 1:03d}"


def open_previous_model(plans: Plans, site: str, folder: Path, round_index: int) -> WeightFileReader:
    """The checked model file `site` loaded for round `round_index` + 1 (hash, plan, round, signature)."""
    path = Path(folder) / f"{site}.safetensors"
    if not path.is_file():
        raise InputError(
            f"not found: clip_norm measures each update against the model its site started from "
            f"(round {round_index}); pass the previous round folder (--previous)", path,
        )
    check_committed(path)   # only a file its round's record lists
    reader = open_reader(path)
    # header against the manifest first: the hash pass then reads at most one model
    check_declared_tensors(reader, expected_parameters(plans, site), f"site {site!r}'s network")
    reader.verify_hash()
    meta = reader.meta
    if meta.kind != "model" or meta.plan_id != plans.plan_id or meta.round != round_index:
        raise InputError(
            f"is not the round-{round_index} model of this plan (kind {meta.kind!r}, round {meta.round}, "
            f"plan_id {meta.plan_id[:12]}…); pass the previous round folder (--previous)", path,
        )
    if plans.keys:
        verify_signature(plans.keys, path, meta.content_hash, COORDINATOR)
    return reader


def clip_factors(
    plans: Plans,
    robust: RobustSpec,
    updates: Sequence[ValidatedUpdate],
    out_dir: Path,
    previous_dir: str | Path | None,
    round_index: int,
    log: Callable[[str], None] | None,
) -> dict[str, Clip]:
    """Per site: norm of its update delta (update − model it started from) and the clip scale
    (none without clip_norm).

    One streaming pass per update (and its previous model), a block at a time, before any
    arithmetic on the pools.
    """
    if robust.clip_norm is None:
        return {}
    folder = Path(previous_dir) if previous_dir is not None else previous_round_dir(out_dir, round_index)
    clips: dict[str, Clip] = {}
    for update in updates:
        previous = open_previous_model(plans, update.site, folder, round_index - 1)
        sumsq = 0.0
        for name in update.reader.keys():
            info = previous.infos.get(name)
            if info is None or info.shape != update.reader.infos[name].shape:
                raise InputError(
                    f"lacks tensor {name!r} as site {update.site!r} sends it, so its update delta cannot be measured",
                    previous.path,
                )
            sumsq += delta_sumsq(update.reader.get_tensor(name), previous.get_tensor(name))
        norm = math.sqrt(sumsq)
        clips[update.site] = Clip(previous, norm, clip_factor(norm, robust.clip_norm))
    scaled = {s: c for s, c in clips.items() if c.factor < 1.0}
    if scaled and log is not None:
        log("clip_norm: scaled " + ", ".join(f"{s} (delta norm {c.delta_norm:.4g})" for s, c in sorted(scaled.items())))
    return clips


def contribution_array(array: np.ndarray, clip: Clip | None, name: str) -> np.ndarray | ClippedTensor:
    """The site's tensor as the combiner reads it: clipped lazily, block by block (O(model)
    memory over all sites, see ClippedTensor), or the memory-mapped tensor itself."""
    if clip is None or clip.factor == 1.0:
        return array
    return ClippedTensor(array, clip.previous.get_tensor(name), clip.factor)



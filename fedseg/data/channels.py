"""A site's channels inside the federation's channel list (mix-modal federations).

Usually every site holds the plan's channels, in the plan's order, and nothing changes. In a
mix-modal federation (strategies that accept sites with different subsets of channels, e.g.
MRI sequences) the plan's channel list is the union over sites, and a site holds a subset:
its case arrays are laid out in the plan's order with the channels it lacks filled with
zeros (after normalisation zero is the mean intensity, so an absent channel carries no
signal); networks that know which channels are present (mixmfl) ignore those zeros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from fedseg.errors import InputError


def plan_channel_list(channel_names: Mapping[str, str]) -> list[str]:
    """{"0": "T1", "1": "T2"} -> ["T1", "T2"] (in index order)."""
    return [channel_names[k] for k in sorted(channel_names, key=int)]


def site_channel_indices(plan_channels: Sequence[str], site_channels: Sequence[str]) -> list[int] | None:
    """For each of the site's channels (in its own order), its index in the plan; None = identity.

    Channels are matched by name when every site channel is named in the plan (a plan merged
    by name); a site with as many channels as the plan whose names do not all appear there
    (a plan merged by index, e.g. "CT|ct") keeps the index order, as before mix-modal support.
    """
    plan_channels, site_channels = list(plan_channels), list(site_channels)
    if site_channels == plan_channels:
        return None
    if all(name in plan_channels for name in site_channels):
        if len(set(site_channels)) != len(site_channels):
            raise InputError(f"the site's channels {site_channels} name a channel twice")
        indices = [plan_channels.index(name) for name in site_channels]
        return None if indices == list(range(len(plan_channels))) else indices
    if len(site_channels) == len(plan_channels):
        return None
    raise InputError(
        f"the site's channels {site_channels} are not among the plan's channels {plan_channels}"
    )


def expand_to_plan(data: np.ndarray, indices: Sequence[int] | None, n_plan_channels: int) -> np.ndarray:
    """(C_site, ...) -> (C_plan, ...) with the site's channels at `indices` and zeros elsewhere."""
    if indices is None:
        return data
    if data.shape[0] != len(indices):
        raise ValueError(f"data has {data.shape[0]} channel(s), the site holds {len(indices)}")
    out = np.zeros((n_plan_channels, *data.shape[1:]), dtype=data.dtype)
    out[list(indices)] = data
    return out


def present_channels(plan_channels: Sequence[str], site_channels: Sequence[str]) -> list[int]:
    """Sorted plan indices of the channels a site holds."""
    indices = site_channel_indices(plan_channels, site_channels)
    return list(range(len(plan_channels))) if indices is None else sorted(indices)


def channel_keys(channel_names: Sequence[str]) -> list[str]:
    """A parameter-name-safe key per channel name ("T1ce" -> "T1ce", "T2-w" -> "T2_w").

    Used in parameter names (`tailored.<key>.…`, `memory.<key>`); a name that cannot be made
    unique this way gets its index ("ch<i>").
    """
    keys = []
    for i, name in enumerate(channel_names):
        key = re.sub(r"[^0-9A-Za-z_]", "_", str(name)) or f"ch{i}"
        if key[0].isdigit():
            key = f"ch_{key}"
        keys.append(key)
    if len(set(keys)) != len(keys):
        keys = [f"ch{i}" for i in range(len(channel_names))]
    return keys

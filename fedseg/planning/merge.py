"""Federated fingerprint merge: the fingerprint of the pooled data, from site summaries alone.

FednnU-Net's Federated Fingerprint Extraction averages the sites' mean, std, median and
percentiles weighted by case count; std and quantiles of a union are not averages of the
parts, so that is wrong whenever sites differ. Here every site sends mergeable statistics
(fedseg.planning.fingerprint, read by fedseg.planning.fingerprint_file), and the merge is exact:

- spacings, shapes_after_crop and relative sizes: concatenated (sites sorted by name, so
  the result does not depend on the order the files were given in);
- mean and std (population, like np.std): from the summed weight, weighted sum and sum of
  squares;
- min, max: exact;
- median, percentile_00_5, percentile_99_5: from the merged quantile sketch, within the
  sketch's relative accuracy of the pooled values.

Intensity statistics come in two weightings. `foreground_intensity_properties_per_channel`
(nnU-Net's key, read by CT normalisation) weights every case with foreground equally — each
of its foreground voxels weighs 1 / (its foreground voxel count) — which is what nnU-Net's
equal number of random samples per case estimates; its quantiles are weighted inverted-CDF
values (what nnU-Net's percentiles of 1e8 samples converge to). Cases without foreground
are left out, as nnU-Net draws no samples from them.
`foreground_intensity_properties_per_channel_voxel_weighted` weights every foreground voxel
equally (the exact statistics of all pooled foreground voxels; quantiles with numpy's linear
interpolation rule).

The result uses nnU-Net's key names, so it compares key for key with nnU-Net's
dataset_fingerprint.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedseg.errors import InputError
from fedseg.planning.fingerprint_file import validate_fingerprint
from fedseg.planning.sketch import QuantileSketch

MERGED_FORMAT = "fedseg.merged_fingerprint"

# nnU-Net's percentiles of the foreground intensities, as (key, q).
_QUANTILES = (("percentile_00_5", 0.005), ("median", 0.5), ("percentile_99_5", 0.995))


def merge_fingerprints(
    fps: Sequence[dict[str, Any]],
    names: Sequence[str] | None = None,
    require_same_channels: bool = True,
) -> dict[str, Any]:
    """Merge site fingerprints into the fingerprint of the pooled data (nnU-Net key names).

    `names` (e.g. the fingerprint file paths) identify each input in error messages; by
    default the site names. With `require_same_channels` every site must have the same
    number of channels, merged by index; without it (strategies whose sites hold different
    subsets of channels) channels are merged by name and the result holds the union.
    Refuses (InputError naming the input) fingerprints that disagree on labels, on 2D vs 3D
    images, on the number of channels (when required), or that repeat a site name.
    """
    fps, names = _checked_and_sorted(fps, names)
    reference = fps[0]
    for fp, name in zip(fps[1:], names[1:]):
        _check_compatible(reference, names[0], fp, name, require_same_channels)

    if require_same_channels:
        channel_names, stats_by_channel = _merge_channels_by_index(fps)
    else:
        channel_names, stats_by_channel = _merge_channels_by_name(fps)
    properties, voxel_properties = _channel_properties(stats_by_channel, channel_names, names)

    relative_sizes = [r for fp in fps for r in fp["relative_sizes_after_crop"]]
    file_endings = sorted({fp["file_ending"] for fp in fps})
    return {
        "format": MERGED_FORMAT,
        "spacings": [list(s) for fp in fps for s in fp["spacings"]],
        "shapes_after_crop": [list(s) for fp in fps for s in fp["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": properties,
        "foreground_intensity_properties_per_channel_voxel_weighted": voxel_properties,
        "median_relative_size_after_cropping": float(np.median(relative_sizes)),
        "n_cases": sum(fp["n_cases"] for fp in fps),
        "sites": {
            fp["site"]: {
                "n_cases": fp["n_cases"],
                "modality": fp["modality"],
                "channel_names": dict(fp["channel_names"]),
                "file_ending": fp["file_ending"],
            }
            for fp in fps
        },
        "channel_names": channel_names,
        "labels": dict(reference["labels"]),
        **({"regions_class_order": list(reference["regions_class_order"])} if reference.get("regions_class_order") else {}),
        # The first of the sites' endings in sorted order (".nii" < ".nii.gz"): both are NIfTI.
        "file_ending": reference["file_ending"] if len(file_endings) == 1 else file_endings[0],
        "image_dim": reference["image_dim"],
        "foreground_voxels_per_channel": {c: v.count for c, (v, _) in stats_by_channel.items()},
        "foreground_cases_per_channel": {c: round(w.weight) for c, (_, w) in stats_by_channel.items()},
        "quantile_relative_accuracy": next(iter(stats_by_channel.values()))[0].alpha,
    }


def _checked_and_sorted(
    fps: Sequence[dict[str, Any]], names: Sequence[str] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate every fingerprint, refuse a repeated site, and sort both lists by site name."""
    if not fps:
        raise InputError("no fingerprints to merge")
    if names is None:
        names = [str(fp.get("site", f"fingerprint {i}")) if isinstance(fp, dict) else f"fingerprint {i}"
                 for i, fp in enumerate(fps)]
    if len(names) != len(fps):
        raise ValueError("names must have one entry per fingerprint")
    for fp, name in zip(fps, names):
        validate_fingerprint(fp, name)

    seen: dict[str, str] = {}
    for fp, name in zip(fps, names):
        if fp["site"] in seen:
            raise InputError(f"site {fp['site']!r} appears twice (also in {seen[fp['site']]})", name)
        seen[fp["site"]] = name

    # Sorting by site name makes every list and every float sum independent of input order.
    order = sorted(range(len(fps)), key=lambda i: fps[i]["site"])
    return [fps[i] for i in order], [names[i] for i in order]


def _check_compatible(ref: dict, ref_name: str, fp: dict, name: str, require_same_channels: bool) -> None:
    if fp["labels"] != ref["labels"] or fp.get("regions_class_order") != ref.get("regions_class_order"):
        raise InputError(
            f"labels {_labels_text(fp['labels'])} of site {fp['site']!r} differ from "
            f"{_labels_text(ref['labels'])} of site {ref['site']!r} ({ref_name})",
            name,
        )
    if fp["image_dim"] != ref["image_dim"]:
        raise InputError(
            f"site {fp['site']!r} has {fp['image_dim']}D images ({fp['file_ending']}) but site {ref['site']!r} "
            f"has {ref['image_dim']}D images ({ref['file_ending']})",
            name,
        )
    if require_same_channels and len(fp["channel_names"]) != len(ref["channel_names"]):
        raise InputError(
            f"site {fp['site']!r} has {len(fp['channel_names'])} channel(s) {list(fp['channel_names'].values())} "
            f"but site {ref['site']!r} has {len(ref['channel_names'])} {list(ref['channel_names'].values())}",
            name,
        )
    ref_alpha = ref["foreground_stats_per_channel"]["0"]["sketch"]["alpha"]
    alpha = fp["foreground_stats_per_channel"]["0"]["sketch"]["alpha"]
    if alpha != ref_alpha:
        raise InputError(
            f"site {fp['site']!r} sketched intensities with accuracy {alpha}, site {ref['site']!r} with {ref_alpha}: "
            "recompute one fingerprint so they agree",
            name,
        )


def _labels_text(labels: dict[str, int | list[int]]) -> str:
    def first_value(item: tuple[str, int | list[int]]) -> int:
        return item[1] if isinstance(item[1], int) else min(item[1])

    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(labels.items(), key=first_value)) + "}"


# Per channel: (voxel-weighted sketch, case-weighted sketch) of the pooled foreground.
_ChannelSketches = tuple[QuantileSketch, QuantileSketch]


def _merge_channels_by_index(fps: list[dict]) -> tuple[dict[str, str], dict[str, _ChannelSketches]]:
    channel_names = {}
    stats = {}
    for channel in sorted(fps[0]["channel_names"], key=int):
        names = sorted({fp["channel_names"][channel] for fp in fps})
        # Sites may name the same channel differently ("CT" / "ct"); keep every name visible.
        channel_names[channel] = names[0] if len(names) == 1 else "|".join(names)
        stats[channel] = _merged_sketches([fp["foreground_stats_per_channel"][channel] for fp in fps])
    return channel_names, stats


def _merge_channels_by_name(fps: list[dict]) -> tuple[dict[str, str], dict[str, _ChannelSketches]]:
    # Union of channel names in order of first appearance (sites sorted by name, channels by index).
    by_name: dict[str, list[dict]] = {}
    for fp in fps:
        for channel in sorted(fp["channel_names"], key=int):
            by_name.setdefault(fp["channel_names"][channel], []).append(fp["foreground_stats_per_channel"][channel])
    channel_names = {str(i): name for i, name in enumerate(by_name)}
    stats = {str(i): _merged_sketches(entries) for i, entries in enumerate(by_name.values())}
    return channel_names, stats


def _merged_sketches(entries: list[dict]) -> _ChannelSketches:
    """Merge the sites' sketches of one channel, in the given (site-sorted) order."""
    voxels = _merged_sketch(entry["sketch"] for entry in entries)
    cases = _merged_sketch(entry["case_weighted"]["sketch"] for entry in entries)
    return voxels, cases


def _merged_sketch(sketch_dicts) -> QuantileSketch:
    merged: QuantileSketch | None = None
    for d in sketch_dicts:
        sketch = QuantileSketch.from_dict(d)
        merged = sketch if merged is None else merged.merge(sketch)
    assert merged is not None
    return merged


def _channel_properties(
    stats_by_channel: dict[str, _ChannelSketches], channel_names: dict[str, str], names: list[str]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per channel, nnU-Net's case-weighted intensity properties and the voxel-weighted ones."""
    properties, voxel_properties = {}, {}
    for channel, (voxels, cases) in stats_by_channel.items():
        if voxels.count == 0:
            raise InputError(
                f"channel {channel} ({channel_names[channel]}) has no foreground voxels at any site: "
                "intensity statistics cannot be computed",
                names[0] if len(names) == 1 else None,
            )
        properties[channel] = _intensity_properties(cases, "inverted_cdf")
        voxel_properties[channel] = _intensity_properties(voxels, "linear")
    return properties, voxel_properties


def _intensity_properties(sketch: QuantileSketch, interpolation: str) -> dict[str, float]:
    quantiles = sketch.quantile(np.array([q for _, q in _QUANTILES]), interpolation=interpolation)
    props = {
        "mean": float(sketch.mean),
        "median": 0.0,
        "std": float(sketch.std),
        "min": float(sketch.min),
        "max": float(sketch.max),
        "percentile_00_5": 0.0,
        "percentile_99_5": 0.0,
    }
    for (key, _), value in zip(_QUANTILES, quantiles):
        props[key] = float(value)
    return props

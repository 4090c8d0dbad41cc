"""Preset `tiny5`: the `tiny` federation with five sites (for robustness experiments).

Five sites are the smallest federation where one attacker is a minority that a coordinate
median or a 20% trimmed mean can outvote (with three, one bad site is a third of the votes).
Sites site_a..site_c are exactly `tiny`'s; site_d and site_e add two more scanners
(spacing, gain, offset and noise in the same ranges).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from fedseg.data.synth import SyntheticCase, SyntheticSite

DESCRIPTION = "5 sites like 'tiny' (3D blob in a body; spacing and intensity differ per site), for robustness tests"
SITES = ("site_a", "site_b", "site_c", "site_d", "site_e")


def _styles():
    from fedseg.data.synth import TINY_STYLES, TinySiteStyle

    return TINY_STYLES + (
        TinySiteStyle((1.2, 1.0, 1.0), scale=2.0, offset=100.0, noise=0.09),
        TinySiteStyle((1.0, 1.3, 1.3), scale=0.8, offset=20.0, noise=0.07),
    )


def tiny5_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    from fedseg.data.synth import (
        TINY_TEST,
        TINY_TRAIN,
        SyntheticCase,
        SyntheticSite,
        _tiny_volume,
        case_rng,
        case_splits,
        geometry_3d,
    )

    style = _styles()[site_index]

    def cases() -> Iterator[SyntheticCase]:
        for i, case_id, split in case_splits(TINY_TRAIN, TINY_TEST):
            image, seg = _tiny_volume(case_rng(seed, site_index, i), style)
            yield SyntheticCase(case_id, split, [image], seg, geometry_3d(image.shape, style.spacing))

    return SyntheticSite(
        channel_names={"0": "MRI"},
        labels={"background": 0, "lesion": 1},
        cases=cases(),
        description=f"fedseg synthetic 'tiny5' preset, {site}",
    )

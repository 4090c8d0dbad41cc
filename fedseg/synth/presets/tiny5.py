"""Preset `tiny5`: the `tiny` federation with five sites (for robustness experiments).

Five sites are the smallest federation where one attacker is a minority that a coordinate
median or a 20% trimmed mean can outvote (with three, one bad site is a third of the votes).
Sites site_a..site_c are exactly `tiny`'s; site_d and site_e add two more scanners
(spacing, gain, offset and noise in the same ranges).
"""

from __future__ import annotations

from fedseg.synth.common import SyntheticSite, lesion_site
from fedseg.synth.presets.tiny import TINY_STYLES, TINY_TEST, TINY_TRAIN, TinySiteStyle, tiny_volume


DESCRIPTION = "5 sites like 'tiny' (3D blob in a body; spacing and intensity differ per site), for robustness tests"
SITES = ("site_a", "site_b", "site_c", "site_d", "site_e")


def _styles():
    return TINY_STYLES + (
        TinySiteStyle((1.2, 1.0, 1.0), scale=2.0, offset=100.0, noise=0.09),
        TinySiteStyle((1.0, 1.3, 1.3), scale=0.8, offset=20.0, noise=0.07),
    )


def tiny5_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    style = _styles()[site_index]
    return lesion_site(f"fedseg synthetic 'tiny5' preset, {site}", site_index, seed, TINY_TRAIN, TINY_TEST,
                       style.spacing, lambda rng: tiny_volume(rng, style))

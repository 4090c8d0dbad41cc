"""Preset `mixmfl`: mix-modal brain-tumour-like MRI, every site holding a different pair of sequences.

The setting of MDM-MixMFL (mix-modal federated learning): the federation knows four MRI
sequences, T1, T1ce, T2 and FLAIR, and each of six sites acquired only two of them (the six
different pairs). The lesion has two labels, and each is visible in different sequences, as
in brain-tumour MRI:

- tumour core (label 1): dark in T1, bright (enhancing) in T1ce; only slightly raised in T2
  and FLAIR, where it is hard to tell from the oedema around it;
- oedema (label 2): an irregular shell around the core, bright in T2 and FLAIR, a faint
  darkening in T1 and invisible in T1ce.

So a site holding T1/T1ce sees the core well but the oedema barely (only through a faint T1
cue and the shape prior "oedema surrounds the core"), and a site holding T2/FLAIR sees the
whole lesion but separates core from oedema poorly: each site needs what the others' sequences
show. Sites differ in intensity gain, offset and noise (data heterogeneity besides the modality
heterogeneity). Volumes are ~22-26 mm at 1 mm (22-26 voxels per axis) so a CPU trains them.

Sites (sorted names, so the federation's sequence order is T1, T1ce, T2, FLAIR):
site1 T1+T1ce, site2 T1+T2, site3 T1+FLAIR, site4 T1ce+T2, site5 T1ce+FLAIR, site6 T2+FLAIR.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fedseg.synth.common import (
    SyntheticCase, SyntheticSite, case_rng, case_splits, ellipsoid_field, geometry_3d, physical_grid, smooth_noise, soften,
)

SEQUENCES = ("T1", "T1ce", "T2", "FLAIR")
SITE_SEQUENCES: dict[str, tuple[str, str]] = {
    "site1": ("T1", "T1ce"),
    "site2": ("T1", "T2"),
    "site3": ("T1", "FLAIR"),
    "site4": ("T1ce", "T2"),
    "site5": ("T1ce", "FLAIR"),
    "site6": ("T2", "FLAIR"),
}
SITES = tuple(SITE_SEQUENCES)
DESCRIPTION = (
    "6 sites, 3D ~24 mm volumes, 4 MRI sequences of which each site holds a different pair; "
    "tumour core shows in T1/T1ce, oedema in T2/FLAIR"
)
LABELS = {"background": 0, "tumour_core": 1, "oedema": 2}

# Relative intensity (healthy tissue = 1) of core and oedema per sequence: the core is
# defined by T1 (dark) and T1ce (enhancing), the oedema by T2/FLAIR (bright); T1 keeps a faint
# oedema cue (as real T1 shows oedema slightly hypointense), T2/FLAIR a weak core one.
CONTRAST: dict[str, tuple[float, float]] = {   # sequence -> (core, oedema)
    "T1": (0.55, 0.88),
    "T1ce": (1.8, 1.0),
    "T2": (1.35, 1.75),
    "FLAIR": (1.2, 1.85),
}
MIXMFL_TRAIN, MIXMFL_TEST = 10, 4
FOV_MM = 24.0
SPACING = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class SiteStyle:
    scale: float      # intensity gain of this site's scanner
    offset: float     # intensity offset inside the head
    noise: float      # noise std relative to the tissue level


STYLES = (
    SiteStyle(1.0, 0.0, 0.08),
    SiteStyle(2.5, 100.0, 0.10),
    SiteStyle(0.6, 20.0, 0.07),
    SiteStyle(1.5, 50.0, 0.12),
    SiteStyle(0.8, 0.0, 0.09),
    SiteStyle(3.0, 150.0, 0.10),
)
TISSUE = 100.0


def mixmfl_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    """One site of the preset: its pair of sequences, labels and cases."""
    sequences = SITE_SEQUENCES[site]
    style = STYLES[site_index]

    def cases() -> Iterator[SyntheticCase]:
        for i, case_id, split in case_splits(MIXMFL_TRAIN, MIXMFL_TEST):
            images, seg = mixmfl_volume(seed, site_index, i, sequences, style)
            yield SyntheticCase(case_id, split, images, seg, geometry_3d(seg.shape, SPACING))

    return SyntheticSite(
        channel_names={str(i): name for i, name in enumerate(sequences)},
        labels=dict(LABELS),
        cases=cases(),
        description=f"fedseg synthetic 'mixmfl' preset, {site} ({' + '.join(sequences)})",
    )


def mixmfl_volume(
    seed: int, site_index: int, case_index: int, sequences: tuple[str, ...], style: SiteStyle
) -> tuple[list[np.ndarray], np.ndarray]:
    """(one image per sequence, label) of one case; the anatomy does not depend on the sequences."""
    rng = case_rng(seed, site_index, case_index)
    fov = FOV_MM * rng.uniform(0.93, 1.07, size=3)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, SPACING))
    grid = physical_grid(shape, SPACING)
    sigma = [3.0 / s for s in SPACING]

    head_radii = fov / 2 * rng.uniform(0.8, 0.92, size=3)
    head = ellipsoid_field(grid, rng.uniform(-1, 1, size=3), head_radii) + 0.1 * smooth_noise(rng, shape, sigma) < 1

    # Core: a 3-5 mm blob; oedema: an irregular, off-centre shell 2-6 mm thick around it, so its
    # extent cannot be read off the core alone.
    core_radii = rng.uniform(3.0, 5.0, size=3)
    centre = rng.uniform(-1, 1, size=3) * np.maximum(head_radii - core_radii - 6.0, 0.5)
    core = ellipsoid_field(grid, centre, core_radii) + 0.2 * smooth_noise(rng, shape, sigma) < 1
    shell = core_radii + rng.uniform(2.0, 6.0, size=3)
    shift = rng.uniform(-2.0, 2.0, size=3)
    whole = ellipsoid_field(grid, centre + shift, shell) + 0.45 * smooth_noise(rng, shape, [4.0 / s for s in SPACING]) < 1
    core &= head
    oedema = whole & head & ~core
    seg = np.zeros(shape, dtype=np.uint8)
    seg[oedema] = 2
    seg[core] = 1

    texture = 1.0 + 0.08 * smooth_noise(rng, shape, sigma)
    soft_core, soft_oedema = soften(core, SPACING), soften(oedema, SPACING)
    images = []
    for index, name in enumerate(SEQUENCES):
        # one noise stream per sequence: a sequence looks the same whichever site holds it
        seq_rng = case_rng(seed, site_index, case_index, stream=1 + index)
        core_level, oedema_level = CONTRAST[name]
        level = 1.0 + (core_level - 1.0) * soft_core + (oedema_level - 1.0) * soft_oedema
        clean = TISSUE * level * texture
        noisy = clean + style.noise * TISSUE * seq_rng.standard_normal(shape).astype(np.float32)
        image = np.where(head, style.scale * noisy + style.offset, 0.0).astype(np.float32)
        image[head & (image <= 0)] = 1e-3   # the head stays nonzero: nonzero cropping finds exactly it
        if name in sequences:
            images.append(image)
    return images, seg

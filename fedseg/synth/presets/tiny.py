"""Preset `tiny`: 3 sites, 3D, ~30 mm volumes (14-32 voxels per axis), one MRI-like channel, a
bright blob ("lesion") inside a nonzero "body"; spacings 1x1x1, 1.5x1x1, 2x1.2x1.2 mm over
similar physical extents. Generated in about a second; learnable in a few dozen iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.synth.common import SyntheticSite, ellipsoid_field, lesion_site, physical_grid, smooth_noise, soften

@dataclass(frozen=True)
class TinySiteStyle:
    spacing: tuple[float, float, float]   # (z, y, x) mm
    scale: float                          # intensity gain of this "scanner"
    offset: float                         # intensity offset inside the body
    noise: float                          # noise std relative to the tissue level


TINY_FOV_MM = (30.0, 30.0, 30.0)          # similar physical extent at every site
TINY_STYLES = (
    TinySiteStyle((1.0, 1.0, 1.0), scale=1.0, offset=0.0, noise=0.08),
    TinySiteStyle((1.5, 1.0, 1.0), scale=3.0, offset=200.0, noise=0.10),
    TinySiteStyle((2.0, 1.2, 1.2), scale=0.5, offset=40.0, noise=0.06),
)
TINY_TRAIN, TINY_TEST = 8, 4
# Tissue ~100, lesion ~200: a contrast-to-noise ratio near 10, so a small U-Net finds the
# lesion within a few dozen iterations while intensities still differ across sites.
TINY_TISSUE, TINY_LESION = 100.0, 200.0


def tiny_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    style = TINY_STYLES[site_index]
    return lesion_site(f"fedseg synthetic 'tiny' preset, {site}", site_index, seed, TINY_TRAIN, TINY_TEST,
                       style.spacing, lambda rng: tiny_volume(rng, style))


def tiny_volume(rng: np.random.Generator, style: TinySiteStyle) -> tuple[np.ndarray, np.ndarray]:
    # Field of view jitters a little per case so shapes differ (as real scans do).
    fov = np.asarray(TINY_FOV_MM) * rng.uniform(0.9, 1.05, size=3)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, style.spacing))
    grid = physical_grid(shape, style.spacing)
    sigma_vox = [4.0 / s for s in style.spacing]       # ~4 mm smoothness whatever the spacing

    # Body: an ellipsoid filling most of the field of view, with a wobbly outline.
    body_radii = fov / 2 * rng.uniform(0.75, 0.9, size=3)
    body = ellipsoid_field(grid, rng.uniform(-1, 1, size=3), body_radii) + 0.15 * smooth_noise(rng, shape, sigma_vox) < 1

    # Lesion: one or two blobs of 5-8 mm radius inside the body.
    lesion = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 3)):
        radii = rng.uniform(5.0, 8.0, size=3)
        centre = rng.uniform(-1, 1, size=3) * np.maximum(body_radii - radii - 2.0, 0.5)
        lesion |= ellipsoid_field(grid, centre, radii) + 0.25 * smooth_noise(rng, shape, sigma_vox) < 1
    lesion &= body

    texture = 1.0 + 0.1 * smooth_noise(rng, shape, sigma_vox)
    clean = (TINY_TISSUE + (TINY_LESION - TINY_TISSUE) * soften(lesion, style.spacing)) * texture
    noisy = clean + style.noise * TINY_TISSUE * rng.standard_normal(shape).astype(np.float32)
    image = np.where(body, style.scale * noisy + style.offset, 0.0).astype(np.float32)
    # Keep the body strictly nonzero: nonzero cropping must find exactly the body.
    image[body & (image == 0)] = 1e-3
    return image, lesion.astype(np.uint8)

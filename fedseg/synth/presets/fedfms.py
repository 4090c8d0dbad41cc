"""Synthetic 2D preset `fedfms`: fundus-like 64x64 PNG images from three "cameras".

Modelled on FedFMS' fundus task (optic disc and cup segmentation across hospitals): a round
field of view with a reddish-grey retina, dark vessels radiating from a bright optic disc,
and a brighter cup inside the disc. Labels: background 0, disc rim 1 ("disc": the disc
without the cup), cup 2. Sites differ like cameras do: brightness, contrast, gamma, blur and
noise, and the position and size of the disc jitter per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from fedseg.data.image_io import DUMMY_2D_SPACING, Geometry
from fedseg.synth.common import SyntheticCase, SyntheticSite, case_rng, case_splits, smooth_noise

SIZE = 64                      # pixels per side: small enough for CPU training in seconds
FEDFMS_TRAIN, FEDFMS_TEST = 12, 4
SITES = ("site_a", "site_b", "site_c")
DESCRIPTION = "3 sites, 2D 64x64 fundus-like PNGs (optic disc and cup); brightness, gamma, blur, noise differ per site"


@dataclass(frozen=True)
class CameraStyle:
    gain: float        # overall brightness
    contrast: float    # disc/cup contrast against the retina (1 = reference)
    gamma: float       # display gamma of the camera
    blur: float        # optical blur, pixels (Gaussian sigma)
    noise: float       # sensor noise std, grey levels


CAMERAS = (
    CameraStyle(gain=1.0, contrast=1.0, gamma=1.0, blur=0.6, noise=6.0),
    CameraStyle(gain=0.7, contrast=0.8, gamma=1.3, blur=1.0, noise=4.0),
    CameraStyle(gain=1.2, contrast=1.1, gamma=0.8, blur=0.4, noise=9.0),
)
RETINA, DISC, CUP = 90.0, 170.0, 215.0    # reference grey levels (0-255 PNG)
VESSEL_DEPTH = 45.0                        # how much darker vessels are than their surroundings


def make_fedfms_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    style = CAMERAS[site_index % len(CAMERAS)]

    def cases() -> Iterator[SyntheticCase]:
        for i, case_id, split in case_splits(FEDFMS_TRAIN, FEDFMS_TEST):
            image, seg = fundus_image(case_rng(seed, site_index, i), style)
            geometry = Geometry((1, SIZE, SIZE), (DUMMY_2D_SPACING, 1.0, 1.0), (), (), True)
            yield SyntheticCase(case_id, split, [image[None]], seg[None], geometry)

    return SyntheticSite(
        channel_names={"0": "fundus"},
        labels={"background": 0, "disc": 1, "cup": 2},
        cases=cases(),
        file_ending=".png",
        description=f"fedseg synthetic 'fedfms' preset (fundus-like 2D), {site}",
    )


def fundus_image(rng: np.random.Generator, style: CameraStyle) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 0-255, label uint8) of shape (SIZE, SIZE)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    centre = (SIZE - 1) / 2.0
    fov = (yy - centre) ** 2 + (xx - centre) ** 2 < (0.47 * SIZE) ** 2

    # disc: an ellipse somewhere in the central part of the field; cup: 35-60 % of it
    cy, cx = centre + rng.uniform(-0.18, 0.18, size=2) * SIZE
    ry, rx = rng.uniform(0.12, 0.18) * SIZE, rng.uniform(0.11, 0.17) * SIZE
    disc = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    ratio = rng.uniform(0.35, 0.6)
    oy, ox = rng.uniform(-0.15, 0.15, size=2) * np.array([ry, rx])
    cup = ((yy - cy - oy) / (ry * ratio)) ** 2 + ((xx - cx - ox) / (rx * ratio)) ** 2 < 1
    cup &= disc

    # vessels: a few dark curves leaving the disc in random directions
    vessels = np.zeros((SIZE, SIZE), dtype=np.float32)
    for angle in rng.uniform(0, 2 * np.pi, size=rng.integers(4, 7)):
        bend = rng.uniform(-0.03, 0.03)
        t = np.linspace(0, SIZE * 0.6, 200)
        theta = angle + bend * t
        py, px = cy + t * np.sin(theta), cx + t * np.cos(theta)
        keep = (py >= 0) & (py < SIZE) & (px >= 0) & (px < SIZE)
        vessels[py[keep].astype(int), px[keep].astype(int)] = 1.0
    vessels = np.clip(ndi.gaussian_filter(vessels, 0.7) * 3.0, 0, 1)

    texture = 1.0 + 0.08 * smooth_noise(rng, (SIZE, SIZE), (3.0, 3.0))
    clean = RETINA + style.contrast * ((DISC - RETINA) * disc + (CUP - DISC) * cup)
    clean = ndi.gaussian_filter(clean.astype(np.float32), 1.0) * texture - VESSEL_DEPTH * vessels * (~cup)
    clean = ndi.gaussian_filter(clean, style.blur)
    # camera: gamma on the 0-1 scale, gain, noise; black outside the field of view
    shaped = 255.0 * np.clip(clean / 255.0, 0, 1) ** style.gamma * style.gain
    noisy = shaped + style.noise * rng.standard_normal((SIZE, SIZE))
    image = np.where(fov, np.clip(noisy, 1.0, 255.0), 0.0).astype(np.float32)
    seg = np.where(cup, 2, np.where(disc, 1, 0)).astype(np.uint8)
    seg[~fov] = 0
    return image, seg

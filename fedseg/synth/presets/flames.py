"""Preset `flames`: two imaging modalities, three organs, sites of very different size (2D).

The setting of FLAMES (Federated Learning for Advanced MEdical Segmentation): three large
MRI sites that all image one organ (a brain with a bright lesion), and two small ultrasound
sites that image two other organs (a breast and an ovary, each with a dark, hypoechoic
lesion in speckle). The appearance differs the way it does between real modalities:

- MRI ("MRI" channel): smooth tissue, a zero background around the head, a bright skull
  rim, dark ventricles (not lesion), a BRIGHT lesion; each site has its own gain, contrast
  (gamma) and noise level, as different scanners would.
- Ultrasound ("US" channel): multiplicative Rayleigh speckle over the whole field, depth
  attenuation, bright echogenic spots (not lesion), a DARK lesion with posterior acoustic
  enhancement. Breast: horizontal tissue layers under a bright skin line. Ovary: a bright
  ovary in darker pelvic tissue, the lesion a cyst inside it.

So the cue that marks a lesion in one modality (bright) marks background in the other: a
single model dominated by the MRI sites' case counts mis-segments ultrasound, which is what
modality-specific models fix. Labels: background 0, lesion 1 at every site.

Besides the sites, the preset writes `_server_test/` (the coordinator's own held-out test
set, FLAMES' Table 4): unseen cases of every organ mixed in one folder (imagesTs, labelsTs,
dataset.json with `case_modality` and `case_organ` maps). Its name starts with "_", so
`fedseg simulate` does not take it for a site.

Images are 64x64 pixels (uint8 range, so they can be written as PNG); the default file type
is PNG, `flames_site(..., file_ending=".nii.gz")` writes 2D NIfTI with physical spacings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from fedseg.data.image_io import DUMMY_2D_SPACING, Geometry
from fedseg.synth.common import SyntheticCase, SyntheticSite, case_rng, case_splits, smooth_noise


IMAGE_SIZE = 64                       # pixels per side: small enough for quick CPU training
LABELS = {"background": 0, "lesion": 1}
SERVER_TEST = "_server_test"          # folder of the server-side test set (not a site)
N_SERVER_PER_ORGAN = 10
DESCRIPTION = (
    "2D: 3 large MRI sites (brain, bright lesion) + 2 small ultrasound sites (breast, ovary; speckle, "
    "dark lesion) + a mixed server test set"
)


@dataclass(frozen=True)
class FlamesSiteStyle:
    modality: str           # channel name: "MRI" or "US" (the modality the plan groups by)
    organ: str              # "brain" | "breast" | "ovary"
    n_train: int
    n_test: int
    gain: float             # intensity gain of this scanner
    gamma: float            # contrast curve of this scanner
    noise: float            # additive noise (MRI) or speckle strength (US)
    spacing_mm: float       # in-plane pixel spacing (written to NIfTI; PNG has none)


# The MRI sites hold ~6x the ultrasound sites' cases, as in FLAMES (Table 2: ~6200 MRI
# images per site vs 165 and 991 ultrasound images), so FedAvg's case weighting lets MRI dominate.
FLAMES_STYLES: dict[str, FlamesSiteStyle] = {
    "mri_a": FlamesSiteStyle("MRI", "brain", 40, 10, gain=1.0, gamma=1.0, noise=4.0, spacing_mm=1.0),
    "mri_b": FlamesSiteStyle("MRI", "brain", 40, 10, gain=0.8, gamma=1.2, noise=6.0, spacing_mm=1.0),
    "mri_c": FlamesSiteStyle("MRI", "brain", 40, 10, gain=1.15, gamma=0.85, noise=5.0, spacing_mm=1.0),
    "us_breast": FlamesSiteStyle("US", "breast", 8, 10, gain=1.0, gamma=1.0, noise=0.55, spacing_mm=0.5),
    "us_ovary": FlamesSiteStyle("US", "ovary", 12, 10, gain=0.9, gamma=1.1, noise=0.6, spacing_mm=0.5),
}
FLAMES_SITES: tuple[str, ...] = (*FLAMES_STYLES, SERVER_TEST)
# Server cases come from scanners between the sites' ones (unseen settings, same modality).
SERVER_STYLES: dict[str, FlamesSiteStyle] = {
    "brain": FlamesSiteStyle("MRI", "brain", 0, N_SERVER_PER_ORGAN, gain=0.95, gamma=1.05, noise=5.0, spacing_mm=1.0),
    "breast": FlamesSiteStyle("US", "breast", 0, N_SERVER_PER_ORGAN, gain=0.95, gamma=1.05, noise=0.55, spacing_mm=0.5),
    "ovary": FlamesSiteStyle("US", "ovary", 0, N_SERVER_PER_ORGAN, gain=0.95, gamma=1.05, noise=0.6, spacing_mm=0.5),
}
# Seed stream of the server cases: never the same random numbers as any site's cases.
SERVER_STREAM = 7


def flames_site(
    site: str,
    site_index: int,
    seed: int,
    file_ending: str = ".png",
    n_train: int | None = None,
    n_test: int | None = None,
) -> SyntheticSite:
    """One site of the preset (or the server test set for `site == "_server_test"`)."""
    if site == SERVER_TEST:
        return _server_site(seed, file_ending, n_test)
    style = FLAMES_STYLES[site]
    n_train = style.n_train if n_train is None else n_train
    n_test = style.n_test if n_test is None else n_test

    def cases() -> Iterator[SyntheticCase]:
        for i, case_id, split in case_splits(n_train, n_test):
            image, seg = make_image(case_rng(seed, site_index, i), style)
            yield SyntheticCase(case_id, split, [image], seg, _geometry(style, file_ending))

    return SyntheticSite(
        channel_names={"0": style.modality},
        labels=dict(LABELS),
        cases=cases(),
        file_ending=file_ending,
        description=f"fedseg synthetic 'flames' preset: {style.modality} of the {style.organ}, {site}",
    )


def _server_site(seed: int, file_ending: str, n_per_organ: int | None) -> SyntheticSite:
    n = N_SERVER_PER_ORGAN if n_per_organ is None else n_per_organ
    ids = {organ: [f"{organ}_{i:03d}" for i in range(n)] for organ in SERVER_STYLES}

    def cases() -> Iterator[SyntheticCase]:
        for organ_index, (organ, style) in enumerate(SERVER_STYLES.items()):
            for i, case_id in enumerate(ids[organ]):
                image, seg = make_image(case_rng(seed, organ_index, i, SERVER_STREAM), style)
                yield SyntheticCase(case_id, "Ts", [image], seg, _geometry(style, file_ending))

    return SyntheticSite(
        # One channel; its name only matters to sites (the server test set is never planned from).
        channel_names={"0": "mixed"},
        labels=dict(LABELS),
        cases=cases(),
        file_ending=file_ending,
        description="fedseg synthetic 'flames' preset: server-side test set, every organ and modality mixed",
        extra={
            "case_modality": {c: SERVER_STYLES[o].modality for o, cs in ids.items() for c in cs},
            "case_organ": {c: o for o, cs in ids.items() for c in cs},
        },
    )


def _geometry(style: FlamesSiteStyle, file_ending: str) -> Geometry:
    spacing = 1.0 if file_ending == ".png" else style.spacing_mm   # PNG stores no spacing
    return Geometry((1, IMAGE_SIZE, IMAGE_SIZE), (DUMMY_2D_SPACING, spacing, spacing), (), (), True)


# ----------------------------------------------------------------------------------------
# image models
# ----------------------------------------------------------------------------------------
def make_image(rng: np.random.Generator, style: FlamesSiteStyle) -> tuple[np.ndarray, np.ndarray]:
    """(image (1, y, x) float32 in [0, 255], label (1, y, x) uint8) of one case."""
    if style.organ == "brain":
        image, lesion = _brain(rng, style)
    else:
        image, lesion = _ultrasound(rng, style)
    image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** style.gamma
    return image[None].astype(np.float32), lesion[None].astype(np.uint8)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(IMAGE_SIZE) - (IMAGE_SIZE - 1) / 2.0
    return axis[:, None], axis[None, :]


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    return smooth_noise(rng, (IMAGE_SIZE, IMAGE_SIZE), (sigma, sigma))


def _blob(rng: np.random.Generator, centre: np.ndarray, radii: np.ndarray, wobble: float) -> np.ndarray:
    """An ellipse with an irregular outline (smooth noise on the implicit function)."""
    y, x = _grid()
    field = ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2
    return field + wobble * _smooth_noise(rng, 3.0) < 1


def _brain(rng: np.random.Generator, style: FlamesSiteStyle) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid()
    radii = rng.uniform([25.0, 21.0], [29.0, 26.0])
    centre = rng.uniform(-2, 2, size=2)
    head_field = ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2
    head_field = head_field + 0.05 * _smooth_noise(rng, 4.0)
    head = head_field < 1
    skull = head & (head_field > 0.78)
    texture = 1.0 + 0.08 * _smooth_noise(rng, 3.0)
    image = np.where(head, 90.0 * texture, 0.0)
    image[skull] = 165.0 * texture[skull]
    # Ventricles: two dark elongated structures near the centre (dark but not lesion).
    for side in (-1, 1):
        v_centre = centre + np.array([rng.uniform(-3, 3), side * rng.uniform(4, 6)])
        ventricle = _blob(rng, v_centre, rng.uniform([6.0, 2.5], [9.0, 4.0]), 0.2)
        image[ventricle] = 35.0
    # Lesion: one bright blob inside the brain, clear of the skull.
    lesion_radii = rng.uniform(4.0, 8.5, size=2)
    reach = radii * 0.75 - lesion_radii - 1.0
    lesion_centre = centre + rng.uniform(-1, 1, size=2) * np.maximum(reach, 1.0)
    lesion = _blob(rng, lesion_centre, lesion_radii, 0.3) & head & ~skull
    image[lesion] = 185.0 * texture[lesion]
    image = image * style.gain + style.noise * rng.standard_normal(image.shape)
    image = np.where(head, np.clip(image, 1.0, 255.0), 0.0)   # zero background outside the head
    return image, lesion


def _ultrasound(rng: np.random.Generator, style: FlamesSiteStyle) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid()
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    depth = (y + IMAGE_SIZE / 2.0) / IMAGE_SIZE   # 0 at the probe (top), 1 at the bottom
    texture = _smooth_noise(rng, 2.0)
    if style.organ == "breast":
        # Skin line, subcutaneous fat, then glandular tissue in wavy horizontal layers.
        wave = np.sin(2 * np.pi * (y / rng.uniform(7, 11) + 0.15 * _smooth_noise(rng, 6.0)))
        tissue = 95.0 + 30.0 * wave + 12.0 * texture
        tissue = np.where(depth < 0.08, 190.0, np.where(depth < 0.2, 60.0 + 8.0 * texture, tissue))
        region = depth > 0.25
        lesion_radii = rng.uniform(5.0, 10.0, size=2) * np.array([0.8, 1.2])   # wider than tall
    else:
        # A bright ovary in darker pelvic tissue; the lesion is a cyst inside it.
        tissue = 65.0 + 10.0 * texture
        o_radii = rng.uniform([15.0, 18.0], [19.0, 23.0])
        o_centre = rng.uniform(-4, 4, size=2) + np.array([4.0, 0.0])
        ovary = _blob(rng, o_centre, o_radii, 0.15)
        tissue = np.where(ovary, 125.0 + 15.0 * texture, tissue)
        region = ovary
        lesion_radii = rng.uniform(6.0, 10.0, size=2)
    # Lesion: a dark (hypoechoic) blob within its region.
    ys, xs = np.nonzero(region & (np.abs(y) < IMAGE_SIZE / 2 - 12) & (np.abs(x) < IMAGE_SIZE / 2 - 12))
    pick = rng.integers(len(ys))
    lesion_centre = np.array([y[ys[pick], 0], x[0, xs[pick]]])
    lesion = _blob(rng, lesion_centre, lesion_radii, 0.35)
    # Posterior acoustic enhancement: brighter tissue below a fluid-filled lesion.
    below = (np.abs(x - lesion_centre[1]) < lesion_radii[1]) & (y > lesion_centre[0]) & ~lesion
    tissue = np.where(below, tissue * 1.3, tissue)
    tissue = np.where(lesion, 22.0 + 6.0 * texture, tissue)
    # Bright echogenic spots (calcifications, bowel gas): bright, but not lesion.
    for _ in range(rng.integers(2, 4)):
        spot = _blob(rng, rng.uniform(-24, 24, size=2), rng.uniform(2.0, 4.0, size=2), 0.2) & ~lesion
        tissue = np.where(spot, 215.0, tissue)
    tissue = tissue * np.exp(-0.5 * depth)   # depth attenuation
    # Speckle: Rayleigh-distributed multiplicative noise with ~1-pixel correlation.
    real = gaussian_filter(rng.standard_normal(shape), 0.7)
    imag = gaussian_filter(rng.standard_normal(shape), 0.7)
    speckle = np.sqrt(real ** 2 + imag ** 2)
    speckle /= speckle.mean()
    image = tissue * style.gain * (1.0 + style.noise * (speckle - 1.0))
    return np.clip(image, 1.0, 255.0), lesion

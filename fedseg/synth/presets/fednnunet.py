"""Synthetic preset `fednnunet`: three scanners that differ strongly in slice spacing and field of view.

FednnU-Net's asymmetric averaging exists because hospitals acquire the same anatomy with
very different protocols, so a plan made from the pooled fingerprint fits no site well.
This preset reproduces that on a CPU scale:

    site_a  1.0 mm slices, 1.0 mm in plane, 32 x 36 x 36 voxels   (isotropic research scan)
    site_b  2.5 mm slices, 0.9 mm in plane, 16 x 40 x 40 voxels   (routine clinical protocol)
    site_c  4.0 mm slices, 1.2 mm in plane, 12 x 28 x 28 voxels   (thick-slice, long field of view)

The physical anatomy is the same kind at every site (an ellipsoidal "organ" with a brighter
"lesion" of 5-9 mm radius inside), so what one site learns helps the others; the slice
spacing decides how many slices a lesion spans (3-4 at 4 mm, 10+ at 1 mm), so the
per-site plans get different target spacings, patch sizes, kernels (1x3x3 across thick
slices) and depths (site_c's 28-voxel planes allow only two poolings: a 3-stage U-Net
next to the 4-stage ones of site_a and site_b). Intensities are MRI-like (arbitrary units, a different gain, offset and
noise per site). 8 training and 4 test cases per site; volumes stay under 60k voxels so a
site trains at well under a second per iteration on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.synth.common import SyntheticSite, ellipsoid_field, lesion_site, physical_grid, smooth_noise, soften


@dataclass(frozen=True)
class ScanProtocol:
    spacing: tuple[float, float, float]   # (z, y, x) mm
    shape: tuple[int, int, int]           # nominal (z, y, x) voxels; jittered per case
    scale: float                          # intensity gain of this scanner
    offset: float                         # intensity offset inside the body
    noise: float                          # noise std relative to the tissue level


PROTOCOLS = (
    # fields of view (z, y, x): 32 x 36 x 36 mm, 40 x 36 x 36 mm, 48 x 34 x 34 mm
    ScanProtocol((1.0, 1.0, 1.0), (32, 36, 36), scale=1.0, offset=0.0, noise=0.10),
    ScanProtocol((2.5, 0.9, 0.9), (16, 40, 40), scale=4.0, offset=300.0, noise=0.12),
    ScanProtocol((4.0, 1.2, 1.2), (12, 28, 28), scale=0.3, offset=20.0, noise=0.08),
)
SITES = ("site_a", "site_b", "site_c")
N_TRAIN, N_TEST = 8, 4
# Tissue ~100, lesion ~170: a contrast-to-noise ratio of 6-9, harder than `tiny` (CNR ~10)
# so that a site with little data still has something to gain from the others.
TISSUE, LESION = 100.0, 170.0
# Lesion radii in mm: at 4 mm slices the smallest spans only ~3 slices.
LESION_RADIUS_MM = (5.0, 9.0)


DESCRIPTION = "3 sites with 1, 2.5 and 4 mm slices and different fields of view (per-site plans differ)"


def make_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    protocol = PROTOCOLS[site_index]
    return lesion_site(f"fedseg synthetic 'fednnunet' preset, {site}: {protocol.spacing[0]} mm slices", site_index, seed,
                       N_TRAIN, N_TEST, protocol.spacing, lambda rng: _volume(rng, protocol))


def _volume(rng: np.random.Generator, protocol: ScanProtocol) -> tuple[np.ndarray, np.ndarray]:
    # Shape jitters by up to ~10 % per case, as real scans of different patients do.
    shape = tuple(int(round(n * rng.uniform(0.9, 1.0))) for n in protocol.shape)
    spacing = protocol.spacing
    fov = np.asarray(shape) * np.asarray(spacing)
    grid = physical_grid(shape, spacing)
    sigma_vox = [4.0 / s for s in spacing]     # ~4 mm smooth structures whatever the spacing

    # Organ: an ellipsoid of fixed physical size (so anatomy matches across sites), clipped
    # by the field of view where the scanner sees less of it.
    organ_radii = np.asarray([18.0, 15.0, 15.0]) * rng.uniform(0.85, 1.0, size=3)
    organ = ellipsoid_field(grid, rng.uniform(-2, 2, size=3), organ_radii) + 0.15 * smooth_noise(rng, shape, sigma_vox) < 1

    lesion = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 3)):
        radii = rng.uniform(*LESION_RADIUS_MM, size=3)
        room = np.minimum(organ_radii, fov / 2) - radii - 1.0
        centre = rng.uniform(-1, 1, size=3) * np.maximum(room, 0.5)
        lesion |= ellipsoid_field(grid, centre, radii) + 0.25 * smooth_noise(rng, shape, sigma_vox) < 1
    lesion &= organ

    texture = 1.0 + 0.1 * smooth_noise(rng, shape, sigma_vox)
    clean = (TISSUE + (LESION - TISSUE) * soften(lesion, spacing)) * texture
    noisy = clean + protocol.noise * TISSUE * rng.standard_normal(shape).astype(np.float32)
    image = np.where(organ, protocol.scale * noisy + protocol.offset, 0.0).astype(np.float32)
    image[organ & (image == 0)] = 1e-3        # keep the organ strictly nonzero for cropping
    return image, lesion.astype(np.uint8)

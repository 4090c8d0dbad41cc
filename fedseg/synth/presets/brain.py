"""Preset `brain`: a real T1 MRI shipped with nibabel (33x41x25 @ 2 mm) seen through three
"scanners" (random rotation/scale/translation, bias field, gamma, Rician noise, site spacing and
intensity scale); the label is the tissue mask of the template (Otsu), which leaves out the dark CSF.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from fedseg.errors import InputError
from fedseg.synth.common import SyntheticCase, SyntheticSite, case_rng, case_splits, geometry_3d, smooth_noise

@dataclass(frozen=True)
class ScannerStyle:
    spacing: tuple[float, float, float]   # output voxel spacing (z, y, x) mm
    scale: float                          # intensity gain
    noise: float                          # Rician noise std relative to the median tissue level
    bias: float                           # bias field amplitude (log scale)


BRAIN_STYLES = (
    ScannerStyle((2.0, 2.0, 2.0), scale=1.0, noise=0.03, bias=0.10),
    ScannerStyle((2.5, 2.0, 2.0), scale=0.02, noise=0.05, bias=0.20),
    ScannerStyle((2.0, 2.4, 2.4), scale=4.0, noise=0.04, bias=0.15),
)
BRAIN_TRAIN, BRAIN_TEST = 6, 3
MAX_ROTATION_DEG = 10.0
MAX_SCALING = 0.10
MAX_TRANSLATION_MM = 4.0


def template_path() -> Path:
    """nibabel's bundled T1 example (33x41x25 voxels at 2 mm)."""
    path = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data" / "anatomical.nii"
    if not path.is_file():
        raise InputError("the 'brain' preset needs nibabel's bundled tests/data/anatomical.nii", path)
    return path


def load_brain_template() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image (z, y, x) float32 scaled to median tissue = 1, tissue mask, spacing (z, y, x))."""
    img = nibabel.load(str(template_path()))
    volume = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)  # nibabel x,y,z -> z,y,x
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3][::-1])
    mask = tissue_mask(volume)
    volume = np.clip(volume, 0, None) / float(np.median(volume[mask]))
    return volume, mask, spacing


def tissue_mask(volume: np.ndarray) -> np.ndarray:
    """Otsu threshold, largest connected component, holes filled: the head/brain tissue."""
    mask = volume > threshold_otsu(volume)
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndi.binary_fill_holes(mask)


def random_affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (±10° about each axis) times scaling (±10% per axis), and a translation in mm."""
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    matrix = rotation @ np.diag(rng.uniform(1 - MAX_SCALING, 1 + MAX_SCALING, size=3))
    return matrix, rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, size=3)


def resample_template(
    template: np.ndarray,
    template_spacing: tuple[float, ...],
    out_spacing: tuple[float, ...],
    matrix: np.ndarray,
    translation: np.ndarray,
    order: int,
) -> np.ndarray:
    """Sample `template` on a new grid (same physical extent, `out_spacing`) through an affine.

    Output voxel o sits at physical p = (o - c_out) * s_out (centred); it reads the template at
    q = matrix @ p + translation, i.e. voxel q / s_tmpl + c_tmpl.
    """
    t_spacing = np.asarray(template_spacing)
    o_spacing = np.asarray(out_spacing)
    t_shape = np.asarray(template.shape)
    out_shape = tuple(int(round(n * ts / os_)) for n, ts, os_ in zip(t_shape, t_spacing, o_spacing))
    c_out = (np.asarray(out_shape) - 1) / 2.0
    c_tmpl = (t_shape - 1) / 2.0
    voxel_matrix = np.diag(1 / t_spacing) @ matrix @ np.diag(o_spacing)
    offset = c_tmpl + (translation / t_spacing) - voxel_matrix @ c_out
    return ndi.affine_transform(
        template, voxel_matrix, offset=offset, output_shape=out_shape, order=order, mode="constant", cval=0.0
    )


def brain_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    style = BRAIN_STYLES[site_index]
    template, mask, spacing = load_brain_template()

    def cases() -> Iterator[SyntheticCase]:
        for i, case_id, split in case_splits(BRAIN_TRAIN, BRAIN_TEST):
            rng = case_rng(seed, site_index, i)
            matrix, translation = random_affine(rng)
            image = resample_template(template, spacing, style.spacing, matrix, translation, order=3)
            seg = resample_template(mask.astype(np.float32), spacing, style.spacing, matrix, translation, order=0)
            image = _scanner(rng, np.clip(image, 0, None), style)
            yield SyntheticCase(case_id, split, [image], seg.astype(np.uint8), geometry_3d(image.shape, style.spacing))

    return SyntheticSite(
        channel_names={"0": "T1"},
        labels={"background": 0, "tissue": 1},
        cases=cases(),
        description=f"fedseg 'brain' preset: nibabel's anatomical.nii through simulated scanner {site}",
    )


def _scanner(rng: np.random.Generator, image: np.ndarray, style: ScannerStyle) -> np.ndarray:
    """Bias field, gamma, Rician noise and gain of one simulated acquisition."""
    # Bias field: smooth over ~1/3 of the field of view, multiplicative as in real coils.
    sigma_vox = [n / 3.0 for n in image.shape]
    bias = np.exp(style.bias * smooth_noise(rng, image.shape, sigma_vox))
    gamma = rng.uniform(0.8, 1.25)
    signal = (image * bias) ** gamma
    # Rician noise: magnitude of a complex signal with Gaussian noise in both parts, so the
    # background is positive noise rather than exact zeros, as in real magnitude MRI.
    real = signal + style.noise * rng.standard_normal(image.shape)
    imag = style.noise * rng.standard_normal(image.shape)
    return (style.scale * 1000.0 * np.sqrt(real ** 2 + imag ** 2)).astype(np.float32)

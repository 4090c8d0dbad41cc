"""Synthetic multi-site federations for demos and tests, written as nnU-Net raw folders.

Each preset describes a set of sites; for each site it yields cases (images, label,
geometry). `generate` writes `out_dir/<site>/` with dataset.json, imagesTr, labelsTr,
imagesTs, labelsTs. Sites differ the way real hospitals do: voxel spacing, intensity scale
and offset, noise, so federated planning and normalisation have something to reconcile.

Adding a preset: write a function `(site: str, site_index: int, seed: int) -> SyntheticSite`
(use `case_rng` for per-case randomness so results do not depend on generation order) and
register it in `PRESETS` with its site names.

Presets:
- tiny:  3 sites, 3D, ~30 mm volumes (14-32 voxels per axis), one MRI-like channel, a
         bright blob ("lesion") inside a nonzero "body"; spacings 1x1x1, 1.5x1x1,
         2x1.2x1.2 mm over similar physical extents. Generated in about a second; learnable in a few dozen iterations.
- brain: a real T1 MRI shipped with nibabel (33x41x25 @ 2 mm) seen through three "scanners"
         (random rotation/scale/translation, bias field, gamma, Rician noise, site spacing and
         intensity scale); the label is the tissue mask of the template (Otsu), which
         leaves out the dark CSF.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from fedseg.atomic import write_json_atomic
from fedseg.data import synth_fednnunet
from fedseg.data.image_io import Geometry, write_image, write_segmentation
from fedseg.errors import InputError

Log = Callable[[str], None]
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class SyntheticCase:
    """One generated case: channel images (each (z, y, x)), label (z, y, x) and geometry."""

    case_id: str
    split: str                  # "Tr" or "Ts"
    images: list[np.ndarray]
    seg: np.ndarray
    geometry: Geometry


@dataclass
class SyntheticSite:
    """What a preset produces for one site: dataset.json fields plus a stream of cases."""

    channel_names: dict[str, str]
    labels: dict[str, int]
    cases: Iterable[SyntheticCase]
    file_ending: str = ".nii.gz"
    description: str = ""
    extra: dict = field(default_factory=dict)   # further dataset.json keys (e.g. case_modality)


SiteGenerator = Callable[[str, int, int], SyntheticSite]


@dataclass(frozen=True)
class Preset:
    description: str
    sites: tuple[str, ...]
    make_site: SiteGenerator


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------
def generate(out_dir: str | Path, preset: str = "tiny", seed: int = 0, log: Log | None = None) -> list[Path]:
    """Write every site of `preset` under `out_dir`; returns the site folders in order.

    Deterministic: the same preset and seed give the same voxels. Refuses to write into a
    site folder that already holds files, so existing data is never overwritten or mixed.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (available: {', '.join(sorted(PRESETS))})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output exists and is not a folder", out_dir)
    spec = PRESETS[preset]
    for site in spec.sites:
        site_dir = out_dir / site
        if site_dir.exists() and any(site_dir.iterdir()):
            raise InputError("site folder already exists and is not empty; choose a new output folder", site_dir)
    site_dirs = []
    for index, site in enumerate(spec.sites):
        site_dir = out_dir / site
        site_data = spec.make_site(site, index, seed)
        n_train, n_test = write_site(site_dir, site, site_data)
        if log is not None:
            log(f"{preset}: wrote {site} ({n_train} training, {n_test} test cases)")
        site_dirs.append(site_dir)
    return site_dirs


def write_site(site_dir: Path, name: str, site: SyntheticSite) -> tuple[int, int]:
    """Write one site's cases, then its dataset.json (last, so a folder with a dataset.json is complete)."""
    counts = {"Tr": 0, "Ts": 0}
    ending = site.file_ending
    for case in site.cases:
        if case.split not in counts:
            raise ValueError(f"case {case.case_id}: split must be 'Tr' or 'Ts'")
        for channel, image in enumerate(case.images):
            write_image(image, case.geometry, site_dir / f"images{case.split}" / f"{case.case_id}_{channel:04d}{ending}")
        write_segmentation(case.seg, case.geometry, site_dir / f"labels{case.split}" / f"{case.case_id}{ending}")
        counts[case.split] += 1
    dataset_json = {
        "name": name,
        "description": site.description,
        "channel_names": site.channel_names,
        "labels": site.labels,
        "numTraining": counts["Tr"],
        "file_ending": ending,
        **site.extra,
    }
    write_json_atomic(site_dir / "dataset.json", dataset_json)
    return counts["Tr"], counts["Ts"]


# ----------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------
def case_rng(seed: int, site_index: int, case_index: int, stream: int = 0) -> np.random.Generator:
    """A generator for one case that does not depend on which other cases were generated."""
    return np.random.default_rng([seed, site_index, case_index, stream])


def case_splits(n_train: int, n_test: int) -> Iterator[tuple[int, str, str]]:
    """(case index, case id, split) for n_train training then n_test test cases."""
    for i in range(n_train + n_test):
        yield i, f"case_{i:03d}", "Tr" if i < n_train else "Ts"


def geometry_3d(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
    return Geometry(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), IDENTITY_DIRECTION, False)


def lesion_site(
    description: str,
    site_index: int,
    seed: int,
    n_train: int,
    n_test: int,
    spacing: tuple[float, float, float],
    make_volume: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
) -> SyntheticSite:
    """A one-channel 3D site with labels background/lesion, its cases drawn by `make_volume(rng)`
    (the `tiny`, `tiny5` and `fednnunet` presets differ only in their volumes)."""

    def cases() -> Iterator[SyntheticCase]:
        for i, case_id, split in case_splits(n_train, n_test):
            image, seg = make_volume(case_rng(seed, site_index, i))
            yield SyntheticCase(case_id, split, [image], seg, geometry_3d(image.shape, spacing))

    return SyntheticSite(
        channel_names={"0": "MRI"},
        labels={"background": 0, "lesion": 1},
        cases=cases(),
        description=description,
    )


def physical_grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm, centred on the volume, one open (broadcastable) array per axis."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * sp for n, sp in zip(shape, spacing)]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Iterable[float]) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=tuple(sigma_vox), mode="reflect")
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def ellipsoid_field(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """sum(((x - c) / r)^2): < 1 inside the ellipsoid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def soften(mask: np.ndarray, spacing: tuple[float, ...], mm: float = 0.7) -> np.ndarray:
    """A mask blurred by ~`mm` millimetres: partial-volume edges as a scanner would give."""
    return ndi.gaussian_filter(mask.astype(np.float32), sigma=tuple(mm / s for s in spacing))


# ----------------------------------------------------------------------------------------
# preset: tiny
# ----------------------------------------------------------------------------------------
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


def _tiny_site(site: str, site_index: int, seed: int) -> SyntheticSite:
    style = TINY_STYLES[site_index]
    return lesion_site(f"fedseg synthetic 'tiny' preset, {site}", site_index, seed, TINY_TRAIN, TINY_TEST,
                       style.spacing, lambda rng: _tiny_volume(rng, style))


def _tiny_volume(rng: np.random.Generator, style: TinySiteStyle) -> tuple[np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------------------------
# preset: brain (real MRI through simulated scanners)
# ----------------------------------------------------------------------------------------
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
    import nibabel

    path = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data" / "anatomical.nii"
    if not path.is_file():
        raise InputError("the 'brain' preset needs nibabel's bundled tests/data/anatomical.nii", path)
    return path


def load_brain_template() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image (z, y, x) float32 scaled to median tissue = 1, tissue mask, spacing (z, y, x))."""
    import nibabel

    img = nibabel.load(str(template_path()))
    volume = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)  # nibabel x,y,z -> z,y,x
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3][::-1])
    mask = tissue_mask(volume)
    volume = np.clip(volume, 0, None) / float(np.median(volume[mask]))
    return volume, mask, spacing


def tissue_mask(volume: np.ndarray) -> np.ndarray:
    """Otsu threshold, largest connected component, holes filled: the head/brain tissue."""
    from skimage.filters import threshold_otsu

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


def _brain_site(site: str, site_index: int, seed: int) -> SyntheticSite:
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


# ----------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------
from fedseg.data import synth_flames as _flames  # noqa: E402  (it uses the helpers above)
from fedseg.data import synth_mixmfl as _mixmfl  # noqa: E402  (it uses the helpers above)
from fedseg.data import synth_tiny5 as _tiny5  # noqa: E402  (it uses the helpers above)
from fedseg.data import synth_fedfms as _fedfms  # noqa: E402  (it uses the helpers above)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "3 sites, 3D ~30 mm volumes, a bright blob in a body; spacing and intensity differ per site",
        ("site_a", "site_b", "site_c"),
        _tiny_site,
    ),
    "brain": Preset(
        "3 sites seeing nibabel's real T1 MRI through different simulated scanners; label = tissue mask",
        ("site_a", "site_b", "site_c"),
        _brain_site,
    ),
    "flames": Preset(_flames.DESCRIPTION, _flames.FLAMES_SITES, _flames.flames_site),
    "fednnunet": Preset(synth_fednnunet.DESCRIPTION, synth_fednnunet.SITES, synth_fednnunet.make_site),
    "mixmfl": Preset(_mixmfl.DESCRIPTION, _mixmfl.SITES, _mixmfl.mixmfl_site),
    "tiny5": Preset(_tiny5.DESCRIPTION, _tiny5.SITES, _tiny5.tiny5_site),
    "fedfms": Preset(_fedfms.DESCRIPTION, _fedfms.SITES, _fedfms.make_fedfms_site),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)

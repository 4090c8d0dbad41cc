"""What every synthetic preset shares: the case and site records, writing a site as an nnU-Net
raw folder, and the random fields the generators draw from.

Use `case_rng` for per-case randomness so results do not depend on generation order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from fedseg.atomic import write_json_atomic
from fedseg.data.image_io import Geometry, write_image, write_segmentation

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


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------
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

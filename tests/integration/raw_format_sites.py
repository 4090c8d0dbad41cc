"""Tiny sites in every raw format nnU-Net v2 reads, for the format tests (16^3 volumes, 16^2 images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedseg.data.image_io import Geometry, write_image, write_segmentation

SIZE = 16
TIFF_SPACING = [2.0, 1.0, 0.5]   # (z, y, x) in the array's axis order, as nnU-Net's Tiff3DIO reads it
BRATS_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def _case_arrays(rng: np.random.Generator, is_2d: bool, regions: bool) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a bright blob; label 1 on the blob (regions: nested values 1 < 2 < 3)."""
    shape = (1, SIZE, SIZE) if is_2d else (SIZE, SIZE, SIZE)
    grid = np.indices(shape).astype(np.float32)
    centre = [0 if is_2d else rng.uniform(6, 10), rng.uniform(6, 10), rng.uniform(6, 10)]
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    label = (dist < 5).astype(np.uint8)
    if regions:
        label[dist < 3.5] = 2
        label[dist < 2] = 3
    image = 60 + 10 * rng.standard_normal(shape).astype(np.float32) + 120 * (dist < 5) + 30 * (dist < 3)
    return np.clip(image, 0, 255), label


def make_site(root: Path, ending: str, *, rgb: bool = False, regions: bool = False, n_train: int = 3, n_test: int = 1,
              seed: int = 0) -> Path:
    """One nnU-Net raw folder in `ending`; `rgb`: one colour file per case holding three channels."""
    rng = np.random.default_rng(seed)
    is_2d = ending in (".png", ".bmp") or (ending == ".tif" and rgb)
    if is_2d:
        geometry = Geometry((1, SIZE, SIZE), (999.0, 1.0, 1.0), (), (), True)
    elif ending in (".tif", ".tiff"):
        geometry = Geometry((SIZE,) * 3, tuple(TIFF_SPACING), (), (), False)
    else:
        geometry = Geometry((SIZE,) * 3, (2.0, 1.0, 0.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), False)
    for split, n in (("Tr", n_train), ("Ts", n_test)):
        for i in range(n):
            case = f"case_{split.lower()}{i:02d}"
            image, label = _case_arrays(rng, is_2d, regions)
            if rgb:
                _write_rgb(root / f"images{split}" / f"{case}_0000{ending}", image[0], rng)
            else:
                write_image(image, geometry, root / f"images{split}" / f"{case}_0000{ending}")
            # a 3D TIFF gets nnU-Net's spacing file beside it (case_0000.tif -> case.json)
            write_segmentation(label, geometry, root / f"labels{split}" / f"{case}{ending}")
    channels = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "MRI"}
    dataset = {"channel_names": channels, "labels": BRATS_LABELS if regions else {"background": 0, "blob": 1},
               "numTraining": n_train, "file_ending": ending}
    if regions:
        dataset["regions_class_order"] = [1, 2, 3]
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def _write_rgb(path: Path, grey: np.ndarray, rng: np.random.Generator) -> None:
    """An RGB image whose three channels differ (R = the image, G = inverted, B = noise)."""
    grey = np.rint(grey).astype(np.uint8)
    rgb = np.stack([grey, 255 - grey, rng.integers(0, 256, grey.shape, dtype=np.uint8)], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(str(path), rgb, photometric="rgb")
    else:
        from PIL import Image

        Image.fromarray(rgb, mode="RGB").save(path)

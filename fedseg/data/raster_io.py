"""TIFF stacks and natural 2D images (PNG, BMP, 2D TIFF), read and written as nnU-Net v2 does.

nnU-Net's readers, by ending (nnunetv2/imageio):
- NaturalImage2DIO (.png, .bmp, .tif): a 2D image; greyscale is one channel, RGB(A) is three
  (four) channels of the one file, in that order; spacing (999, 1, 1).
- Tiff3DIO (.tif, .tiff): a 3D stack (z, y, x) read with tifffile; the spacing comes from a
  JSON file beside it, `{"spacing": [sz, sy, sx]}` in the array's axis order, named after the
  case without the channel suffix (`case_0000.tif` -> `case.json`; label `case.tif` ->
  `case.json`); without that file the spacing is (1, 1, 1). A prediction is written with
  its JSON beside it.
A .tif is a natural image when it is 2D or 2D with a colour axis of 3 or 4 entries (nnU-Net
tries NaturalImage2DIO first), otherwise a 3D stack.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage import io as skio

from fedseg.atomic import write_json_atomic
from fedseg.data.native_stderr import captured_stderr
from fedseg.errors import InputError

# nnU-Net's placeholder spacing for the non-existent slice axis of 2D images.
DUMMY_2D_SPACING = 999.0
# Tiff3DIO's spacing when no JSON file gives one.
DEFAULT_TIFF_SPACING = (1.0, 1.0, 1.0)
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def is_natural_shape(shape: tuple[int, ...], ending: str) -> bool:
    """Whether a file of this declared shape is read as a natural 2D image (else a 3D stack)."""
    if ending in (".png", ".bmp"):
        return True
    if ending == ".tiff":
        return False
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4))


def read_natural(path: Path, ending: str) -> np.ndarray:
    """(C, 1, y, x) float32: greyscale one channel, RGB(A) three (four), as NaturalImage2DIO."""
    if ending in (".tif", ".tiff"):
        array = _read_tiff_array(path)
    else:
        array = _read_pil(path)
    if array.ndim == 3:
        if array.shape[-1] not in (3, 4):
            raise InputError(f"a 2D image with a colour axis must have 3 or 4 channels (RGB/RGBA), got shape {array.shape}", path)
        return np.ascontiguousarray(np.moveaxis(array, -1, 0))[:, None].astype(np.float32, copy=False)
    if array.ndim != 2:
        raise InputError(f"expected a 2D image, got shape {array.shape}", path)
    return array[None, None].astype(np.float32, copy=False)


def _read_pil(path: Path) -> np.ndarray:
    # The voxel limit (fedseg.data.image_header) has already admitted this image's size, so
    # Pillow's own decompression-bomb warning says nothing new: keep it off stderr.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return np.asarray(skio.imread(str(path)))
        except Image.DecompressionBombError:
            raise InputError("image is larger than the image decoder (Pillow) accepts", path) from None
        except Exception as exc:  # skimage/PIL raise many types for broken files
            raise InputError(f"cannot read image ({type(exc).__name__}: {str(exc)[:200]})", path) from None


def _read_tiff_array(path: Path) -> np.ndarray:
    try:
        with captured_stderr():   # tifffile logs its own complaints about damaged pages
            return np.asarray(tifffile.imread(str(path)))
    except Exception as exc:  # tifffile raises many types for damaged files
        raise InputError(f"cannot read TIFF ({type(exc).__name__}: {str(exc)[:200]})", path) from None


def read_tiff_stack(path: Path, channel_file: bool, as_float: bool = True) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(z, y, x) float32 (or the stored type) and its spacing from the JSON file beside it
    (Tiff3DIO's convention)."""
    array = _read_tiff_array(path)
    if array.ndim != 3:
        raise InputError(f"a 3D TIFF must hold a (z, y, x) stack, got shape {array.shape}", path)
    if as_float:
        array = array.astype(np.float32, copy=False)
    return array, read_spacing_json(spacing_json_path(path, channel_file))


def spacing_json_path(path: Path, channel_file: bool) -> Path:
    """`case_0000.tif` -> `case.json` (a channel file), `case.tif` -> `case.json` (label, prediction)."""
    stem = path.name[: -len(path.suffix)]
    if channel_file:
        stem = CHANNEL_SUFFIX.sub("", stem)
    return path.with_name(stem + ".json")


def read_spacing_json(json_path: Path) -> tuple[float, float, float]:
    if not json_path.is_file():
        return DEFAULT_TIFF_SPACING
    try:
        raw = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"spacing file is not valid JSON ({exc})", json_path) from None
    spacing = raw.get("spacing") if isinstance(raw, dict) else None
    if (
        not isinstance(spacing, list)
        or len(spacing) != 3
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing)
    ):
        raise InputError('spacing file must hold {"spacing": [sz, sy, sx]} with three positive numbers', json_path)
    return tuple(float(s) for s in spacing)


def write_tiff_stack(array: np.ndarray, spacing: tuple[float, ...], tmp: Path, target: Path, channel_file: bool) -> None:
    """Write a (z, y, x) array to `tmp` (renamed onto `target` by the caller) and its spacing JSON."""
    write_json_atomic(spacing_json_path(target, channel_file), {"spacing": [float(s) for s in spacing]})
    tifffile.imwrite(str(tmp), np.asarray(array), compression="zlib", photometric="minisblack")


def write_natural(array2d: np.ndarray, tmp: Path, ending: str) -> None:
    """Write a 2D uint8/uint16 array to `tmp` in the format of `ending`."""
    if ending in (".tif", ".tiff"):
        tifffile.imwrite(str(tmp), array2d, compression="zlib", photometric="minisblack")
        return
    named = tmp.with_name(tmp.name + ending)   # skimage picks the format from the name
    skio.imsave(str(named), array2d, check_contrast=False)
    named.replace(tmp)

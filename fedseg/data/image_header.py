"""An image's declared size, read from its header alone, and the voxel limit checked against it.

An image file from another institution may declare far more voxels than it holds or than a
machine can store (a few MB of gzip'd zeros can declare gigabytes). Every reader checks the
header here before it decompresses a single voxel, so such a file is refused with a clear
message instead of exhausting memory.

"Voxels" is the product of every declared dimension (a 4D NIfTI counts its fourth axis, a
vector image its components); a colour pixel of a PNG/BMP/TIFF counts as one (at most four
values each).

The default limit itself is fedseg.data.voxel_limit (re-exported here), which loads no image
library: the command line shows it in its help.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import nibabel
import SimpleITK as sitk
import tifffile

from fedseg.data.native_stderr import captured_stderr
from fedseg.data.voxel_limit import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError

__all__ = ["DEFAULT_MAX_VOXELS", "PNG_SIGNATURE", "check_voxel_limit", "declared_shape"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def declared_shape(path: Path, ending: str) -> tuple[int, ...]:
    """The dimensions an image file declares, from its header only (no voxel is decompressed).

    InputError if the header cannot be parsed.
    """
    if ending == ".png":
        return _png_shape(path)
    if ending == ".bmp":
        return _bmp_shape(path)
    if ending in (".tif", ".tiff"):
        return _tiff_shape(path)
    if ending in (".nii", ".nii.gz"):
        shape = _nifti_shape(path)
        if shape is not None:
            return shape
    return _sitk_shape(path)


def check_voxel_limit(path: Path, ending: str, max_voxels: int) -> tuple[int, ...]:
    """The declared shape, or InputError when it declares more than `max_voxels` voxels."""
    shape = declared_shape(path, ending)
    n_voxels = math.prod(int(s) for s in shape) if shape else 0
    if n_voxels > max_voxels:
        raise InputError(
            f"image declares {n_voxels} voxels (dimensions {'x'.join(str(int(s)) for s in shape)}), "
            f"above the limit of {max_voxels} (raise it with --max-voxels if the image is genuine)",
            path,
        )
    return shape


def _png_shape(path: Path) -> tuple[int, ...]:
    # Signature, then the IHDR chunk: length, b"IHDR", width, height (big-endian uint32).
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise InputError("not a PNG file (no PNG signature and IHDR header)", path)
    width, height = struct.unpack(">II", head[16:24])
    return (int(height), int(width))


def _bmp_shape(path: Path) -> tuple[int, ...]:
    # BITMAPFILEHEADER (14 bytes), then an info header whose width/height are int32 at 18 and 22
    # (a negative height means rows stored top-down).
    with open(path, "rb") as handle:
        head = handle.read(26)
    if len(head) < 26 or head[:2] != b"BM":
        raise InputError("not a BMP file (no BM header)", path)
    width, height = struct.unpack("<ii", head[18:26])
    return (abs(int(height)), abs(int(width)))


def _tiff_shape(path: Path) -> tuple[int, ...]:
    try:
        with captured_stderr(), tifffile.TiffFile(str(path)) as tif:   # tifffile logs damaged pages
            series = tif.series
            if not series:
                raise InputError("TIFF file holds no image", path)
            # Every series counts: tifffile would read them all into memory in turn.
            shapes = [tuple(int(s) for s in item.shape) for item in series]
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged headers
        raise InputError(f"cannot read TIFF header ({type(exc).__name__}: {str(exc)[:200]})", path) from None
    if len(shapes) == 1:
        return shapes[0]
    return (sum(math.prod(s) for s in shapes),)


def _nifti_shape(path: Path) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in nibabel.load(str(path)).shape)  # lazy: reads the header only
    except Exception:  # not a NIfTI nibabel understands: ask SimpleITK
        return None


def _sitk_shape(path: Path) -> tuple[int, ...]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with captured_stderr():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"cannot read image header: {last[:200]}", path) from None
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    return size[::-1] + ((components,) if components > 1 else ())

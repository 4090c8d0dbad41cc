"""Image I/O with nnU-Net's conventions, for every file ending nnU-Net v2 reads.

Arrays come back in SimpleITK order, (z, y, x) for 3D; spacing in the same order. 2D images
(PNG, BMP, 2D TIFF, or NIfTI with one slice dimension) become (1, y, x) with a dummy spacing
of 999 for the missing axis, as nnU-Net does, so the rest of fedseg handles 2D as 3D with one
slice. NIfTI, NRRD, MetaImage (.mha/.mhd) and GIPL go through SimpleITK (NIfTI's header and
NaN voxels also through nibabel); TIFF stacks and natural images through fedseg.data.raster_io.
Every reader checks the header's declared size against a voxel limit first
(fedseg.data.image_header).
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk

from fedseg.atomic import atomic_path
from fedseg.data.image_header import check_voxel_limit
from fedseg.data.native_stderr import captured_stderr
from fedseg.data.raster_io import (
    DUMMY_2D_SPACING,
    is_natural_shape,
    read_natural,
    read_tiff_stack,
    write_natural,
    write_tiff_stack,
)
from fedseg.data.voxel_limit import DEFAULT_MAX_VOXELS
from fedseg.errors import InputError

# Images of one case may differ in spacing by float noise; more than this is a real mismatch.
SPACING_RTOL = 1e-3

# The endings nnU-Net v2 reads (nnunetv2/imageio), and which reader takes each.
SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gipl")
TIFF_ENDINGS = (".tif", ".tiff")
NATURAL_ENDINGS = (".png", ".bmp")
SUPPORTED_ENDINGS = SITK_ENDINGS + TIFF_ENDINGS + NATURAL_ENDINGS
# A GIPL file is a fixed-size header followed by the raw voxels.
GIPL_HEADER_BYTES = 256


@dataclass(frozen=True)
class Geometry:
    """Where an image lives in space, enough to write a prediction back in the same place."""

    shape: tuple[int, int, int]          # array shape (z, y, x); z == 1 for 2D
    spacing: tuple[float, float, float]  # (z, y, x) in mm; z == 999 for 2D
    origin: tuple[float, ...]            # SimpleITK order (x, y, z); empty for PNG
    direction: tuple[float, ...]         # SimpleITK order; empty for PNG
    is_2d: bool

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "is_2d": self.is_2d,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            shape=tuple(int(v) for v in d["shape"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
            is_2d=bool(d["is_2d"]),
        )


def file_ending_of(path: str | Path) -> str:
    name = str(path).lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    raise InputError(f"unsupported file type (use one of {', '.join(SUPPORTED_ENDINGS)})", path)


def read_channels(
    path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, channel_file: bool = True, as_float: bool = True,
) -> tuple[np.ndarray, Geometry]:
    """Read one image file as (C, z, y, x) float32 plus its geometry; InputError on any fault.

    C is 1 except for colour natural images (RGB: 3, RGBA: 4, as nnU-Net reads them). The
    header is checked against `max_voxels` before any voxel is decompressed.
    `channel_file`: the file is a `{CASE}_{XXXX}` channel (a 3D TIFF's spacing file then
    drops the channel suffix), not a label map. `as_float` False keeps a SimpleITK/TIFF
    image's stored type (a uint8 label map stays uint8: a quarter of float32's memory).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    ending = file_ending_of(path)
    shape = check_voxel_limit(path, ending, max_voxels)
    if ending in NATURAL_ENDINGS or (ending in TIFF_ENDINGS and is_natural_shape(shape, ending)):
        data = read_natural(path, ending)
        return data, Geometry(tuple(data.shape[1:]), (DUMMY_2D_SPACING, 1.0, 1.0), (), (), True)
    if ending in TIFF_ENDINGS:
        stack, spacing = read_tiff_stack(path, channel_file, as_float)
        return stack[None], Geometry(tuple(stack.shape), spacing, (), (), False)
    data, geometry = _read_sitk(path, as_float)
    return data[None], geometry


def read_image(
    path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, as_float: bool = True
) -> tuple[np.ndarray, Geometry]:
    """Read a one-channel image (a label map, a prediction) as (z, y, x) plus its geometry;
    float32, or with `as_float` False the stored type where the format keeps one."""
    data, geometry = read_channels(path, max_voxels, channel_file=False, as_float=as_float)
    if data.shape[0] != 1:
        raise InputError(f"expected a one-channel image, got {data.shape[0]} channels (a colour image?)", path)
    return data[0], geometry


def _read_sitk(path: Path, as_float: bool = True) -> tuple[np.ndarray, Geometry]:
    nifti = check_nifti_complete(path) if file_ending_of(path) in (".nii", ".nii.gz") else None
    if nifti is not None:
        fast = _read_float_nifti(path, nifti)
        if fast is not None:
            return fast
    try:
        with captured_stderr() as printed:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = printed.last_line() or (str(exc).strip().splitlines() or ["unreadable"])[-1][:200]
        raise InputError(f"cannot read image (truncated or corrupt?): {reason}", path) from None
    if file_ending_of(path) == ".gipl":
        check_gipl_complete(path, image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("vector images are not supported: one channel per file", path)
    # A view on ITK's buffer: the float32 conversion below is then the only copy.
    array = sitk.GetArrayViewFromImage(image)
    if nifti is not None:
        array = _restore_nonfinite(array, nifti)
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    origin = tuple(float(v) for v in image.GetOrigin())
    direction = tuple(float(v) for v in image.GetDirection())
    if array.ndim == 2:
        data = array.astype(np.float32 if as_float else array.dtype, copy=True)[None]
        return data, Geometry(tuple(data.shape), (DUMMY_2D_SPACING, *spacing), origin, direction, True)
    if array.ndim != 3:
        raise InputError(f"expected a 2D or 3D image, got {array.ndim} dimensions", path)
    data = array.astype(np.float32 if as_float else array.dtype, copy=True)   # copy: the view dies with `image`
    return data, Geometry(tuple(data.shape), spacing, origin, direction, False)


def check_gipl_complete(path: Path, image: sitk.Image) -> None:
    """ITK fills the missing voxels of a truncated GIPL file without complaint: compare the
    file's size with its fixed 256-byte header plus the voxel bytes the header promises."""
    expected = GIPL_HEADER_BYTES + image.GetNumberOfPixels() * sitk.GetArrayViewFromImage(image).itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"truncated image: {actual} of {expected} bytes present", path)


def _read_float_nifti(path: Path, nifti: nibabel.spatialimages.SpatialImage) -> tuple[np.ndarray, Geometry] | None:
    """A plain 3D float NIfTI, decompressed once: voxels from nibabel, geometry from ITK's header.

    Reading it with ITK would turn NaN/inf into 0, so `_restore_nonfinite` must decompress
    the file a second time with nibabel; for the common case (3D, one component, no intensity
    scaling) nibabel's voxels are ITK's voxels (same file order, NaN kept), so they are used
    directly and ITK reads only the header (spacing, origin, direction, exactly as ReadImage
    gives them). Anything else returns None and takes the general path.
    """
    proxy = nifti.dataobj
    if (
        len(nifti.shape) != 3
        or not np.issubdtype(nifti.header.get_data_dtype(), np.floating)
        or float(getattr(proxy, "slope", 1.0)) != 1.0
        or float(getattr(proxy, "inter", 0.0)) != 0.0
    ):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None   # the general path reports the fault
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        return None
    if tuple(reader.GetSize()) != tuple(nifti.shape):
        return None
    # nibabel is (x, y, z) in Fortran order: the transpose is SimpleITK's C-ordered (z, y, x)
    data = np.ascontiguousarray(np.asarray(proxy, dtype=np.float32).T)
    spacing = tuple(float(s) for s in reader.GetSpacing()[::-1])
    origin = tuple(float(v) for v in reader.GetOrigin())
    direction = tuple(float(v) for v in reader.GetDirection())
    return data, Geometry(tuple(data.shape), spacing, origin, direction, False)


def _restore_nonfinite(array: np.ndarray, nifti: nibabel.spatialimages.SpatialImage) -> np.ndarray:
    """Put back the NaN/inf voxels that ITK's NIfTI reader silently turns into 0.

    A NaN in an image is a broken file the user must hear about (load_case refuses it), not
    a zero. Only float NIfTI files can hold NaN, so integer images cost nothing extra.
    """
    if not np.issubdtype(nifti.header.get_data_dtype(), np.floating):
        return array
    raw = np.asarray(nifti.dataobj, dtype=np.float32).T   # nibabel (x, y, z) -> SimpleITK (z, y, x)
    if raw.shape != array.shape:
        return array
    nonfinite = ~np.isfinite(raw)
    if not nonfinite.any():
        return array
    array = array.astype(np.float32)
    array[nonfinite] = raw[nonfinite]
    return array


def check_nifti_complete(path: Path) -> nibabel.spatialimages.SpatialImage | None:
    """Raise InputError if a NIfTI file holds fewer voxel bytes than its header promises.

    SimpleITK reads a truncated file (an interrupted copy, a full disk) without complaint and
    fills the missing voxels, which would silently train on garbage. The header gives the
    expected size; for .nii.gz the gzip trailer stores the uncompressed size (mod 2^32), so the
    common case costs one seek; only when that does not match is the stream decompressed to
    count its bytes. Returns the (lazily loaded) nibabel image, or None if nibabel cannot
    parse the header (SimpleITK then gives the verdict).
    """
    try:
        image = nibabel.load(str(path))
        offset = int(getattr(image.dataobj, "offset", 0))
        expected = offset + int(np.prod(image.shape, dtype=np.int64)) * image.header.get_data_dtype().itemsize
    except Exception:  # not a NIfTI nibabel understands: leave the verdict to SimpleITK
        return None
    if file_ending_of(path) == ".nii":
        actual = path.stat().st_size
    else:
        with open(path, "rb") as handle:
            handle.seek(-4, 2)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return image
        actual = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 20):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise InputError(
                f"truncated or corrupt gzip stream (the header promises {expected} bytes)", path
            ) from None
    if actual < expected:
        raise InputError(f"truncated image: {actual} of {expected} bytes present", path)
    return image


def write_segmentation(seg: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a (z, y, x) label map in `geometry`, in the format given by the path's ending.

    Writes to a temporary name and renames, so an existing file is only replaced whole.
    """
    seg = np.asarray(seg)
    if tuple(seg.shape) != tuple(geometry.shape):
        raise ValueError(f"segmentation shape {seg.shape} does not match geometry {geometry.shape}")
    # nnU-Net's rule: uint8 when the labels fit, else a wider integer type.
    _write(seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.uint16, copy=False), geometry, Path(path),
           channel_file=False)


def write_image(data: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a float (z, y, x) channel image `{CASE}_{XXXX}{ending}` (synthetic data, tests).

    Natural 2D formats hold 8-bit greyscale: values are clipped to 0..255. A 3D TIFF gets
    its spacing file `{CASE}.json` beside it.
    """
    path = Path(path)
    ending = file_ending_of(path)
    if geometry.is_2d and (ending in NATURAL_ENDINGS or ending in TIFF_ENDINGS):
        data = np.clip(data, 0, 255).astype(np.uint8)
    _write(np.asarray(data, dtype=np.float32) if data.dtype != np.uint8 else data, geometry, path, channel_file=True)


def _write(array: np.ndarray, geometry: Geometry, path: Path, channel_file: bool) -> None:
    ending = file_ending_of(path)
    if ending == ".mhd":
        _write_mhd(array, geometry, path)
        return
    with atomic_path(path) as tmp:
        if ending in NATURAL_ENDINGS or (ending in TIFF_ENDINGS and geometry.is_2d):
            write_natural(array[0], tmp, ending)
        elif ending in TIFF_ENDINGS:
            write_tiff_stack(array, geometry.spacing, tmp, path, channel_file)
        else:
            write_sitk(array, geometry, tmp, ending)


def _write_mhd(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """A MetaImage header names its data file (`case.zraw`) beside it: both are written in a
    temporary folder, then the data file and, last, the header are renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        write_sitk(array, geometry, staged.with_name(staged.name[: -len(".mhd")]), ".mhd")
        header = staging / path.name
        for item in sorted(staging.iterdir(), key=lambda p: p == header):
            item.replace(path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_sitk(array: np.ndarray, geometry: Geometry, tmp: Path, ending: str) -> None:
    if geometry.is_2d:
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing(tuple(geometry.spacing[1:][::-1]))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(geometry.spacing[::-1]))
    if geometry.origin:
        image.SetOrigin(geometry.origin)
    if geometry.direction:
        image.SetDirection(geometry.direction)
    # SimpleITK picks the format from the file name, so write under the real ending.
    named = tmp.with_name(tmp.name + ending)
    sitk.WriteImage(image, str(named), useCompression=ending in (".nii.gz", ".mhd", ".mha", ".nrrd"))
    if ending != ".mhd":
        named.replace(tmp)


def geometries_agree(a: Geometry, b: Geometry) -> bool:
    return a.shape == b.shape and np.allclose(a.spacing, b.spacing, rtol=SPACING_RTOL)

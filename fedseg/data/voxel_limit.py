"""The default limit on the voxels an image file may declare (checked by fedseg.data.image_header).

A constant of its own, apart from the header readers: the command line shows it as an option
default, and reading it must not load the image libraries (SimpleITK, nibabel) the header
readers need.
"""

from __future__ import annotations

# 2^30 voxels: a 1024 x 1024 x 1024 volume, above the largest CT series in routine use
# (e.g. 2000 slices of 512 x 512 = 2^29), and 4 GiB once read as float32.
DEFAULT_MAX_VOXELS = 2**30

"""Atomic file writes: an output is either the complete new file or the old one, never half.

Every writer in fedseg goes through these helpers: write to a temporary name in the same
folder, flush and fsync, then `os.replace` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedseg.errors import InputError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`.

    On an exception the temporary file is removed and `target` is left untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        _refuse_user_fault(exc, target)
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _refuse_user_fault(exc, target)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


# A full disk, an exhausted quota, a file-size limit, a read-only or forbidden folder: the
# user's to fix (exit code 2 naming the file), not a fedseg bug.
USER_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def _refuse_user_fault(exc: OSError, target: Path) -> None:
    if exc.errno in USER_WRITE_ERRNOS:
        raise InputError(f"cannot write ({exc.strerror or exc})", target) from exc


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | Path, obj: Any) -> None:
    """Write JSON; NaN and infinities become null, since JSON has no spelling for them."""
    write_text_atomic(target, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """A copy of `obj` with non-finite floats replaced by None and tuples by lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return json_safe(obj.item())  # numpy scalars
    return obj

"""An advisory lock on a folder, so that two fedseg processes never write into it at once.

Two `aggregate` of the same round, or two `train` with the same site state folder, would
otherwise interleave their files. The lock is `fcntl.flock` on `<folder>/.fedseg.lock`, which
holds the holder's pid: the kernel releases it when its process dies, so a lock left by a
killed process never blocks anyone (the file may stay; a live lock is what counts). The
second process does not wait: it stops at once with exit code 2, naming the holder.

POSIX only (fcntl); on other systems the lock is not taken.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from fedseg.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the lock is not taken
    fcntl = None

LOCK_FILE = ".fedseg.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold the lock of `folder` (created if missing) for the duration of the block.

    `what` names the folder's role in the refusal ("round folder", "site state folder").
    A folder this call created and that is still empty afterwards is removed again, so a
    refusal after locking leaves nothing behind.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]   # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise InputError(f"{what} is in use by pid {holder}; wait for it to finish", folder) from None
        # The previous holder removes the lock file when it is done; if it did so between our
        # open and our flock, we hold a lock on a file nobody else will open: take the new one.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        for made in created:
            try:
                made.rmdir()   # only succeeds when nothing was written
            except OSError:
                break

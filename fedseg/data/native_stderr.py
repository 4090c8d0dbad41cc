"""Capture what image libraries print on the process's stderr while they read a file.

ITK's MetaImage reader (C++) and tifffile (logging) print their own complaints about a
damaged file on stderr before they fail ("data not read completely", "invalid page offset").
fedseg's contract is one line naming the file, so a read runs inside `captured_stderr()`:
file descriptor 2 points to a temporary file for its duration, and the caller may quote the
captured text in its own message.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Captured:
    text: str = ""

    def last_line(self) -> str:
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        return lines[-1][:200] if lines else ""


@contextlib.contextmanager
def captured_stderr() -> Iterator[Captured]:
    """Redirect fd 2 (native and Python writes alike) into `Captured.text` for the block."""
    captured = Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):   # no usable fd 2 (embedded interpreter): capture nothing
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")

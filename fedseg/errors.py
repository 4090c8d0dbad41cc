"""Error types shared by every layer.

`InputError` is the one exception the CLI turns into a one-line message and exit code 2:
raise it for anything the user can fix (a bad file, a missing folder, a wrong option).
Every other exception is an internal error (exit code 1).
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input or usage: the message names the file (when there is one) and the fault."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.detail = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)

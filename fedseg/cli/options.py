"""Options shared by several commands, and small parsing helpers."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.errors import InputError

QUIET = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.")
JSON = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout.")


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> dict, refusing malformed items."""
    overrides: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{what} not found (expected a folder)", path)
    return path

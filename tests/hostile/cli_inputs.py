"""The contract every refusal of the command line keeps (exit 2, one line naming the culprit,
nothing written), as the hostile-input batteries check it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.cli.main import run


def listing(root: Path) -> set[str]:
    """Every path under `root` (relative), to show that a refused command wrote nothing."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(argv: list[str], capsys: pytest.CaptureFixture, *named: str) -> str:
    """Run the CLI and check the refusal contract; returns the error line."""
    capsys.readouterr()
    rc = run(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit {rc} for {argv}: {err}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedseg: error: "), err
    for name in named:
        assert name in err, f"{name!r} not named in: {err}"
    return err

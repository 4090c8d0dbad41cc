"""`fedseg flower ...` without Flower installed: one line, exit 2; the base CLI never imports flwr."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedseg.cli import flower_commands
from fedseg.cli.main import run as cli


@pytest.mark.parametrize("argv", [
    ["flower", "simulate", "sites", "-o", "run"],
    ["flower", "serve", "-o", "run", "--sites", "2", "--insecure"],
    ["flower", "join", "--site", "a", "--data", ".", "--superlink", "127.0.0.1:9092", "--insecure"],
])
def test_flower_commands_without_flwr_say_how_to_install(argv, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flower_commands.importlib.util, "find_spec", lambda name: None)
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'flwr[simulation]>=1.41,<1.42'" in err[0]
    assert not (tmp_path / "run").exists()


def test_install_hint_names_the_flower_extra_of_pyproject() -> None:
    """fedseg is not on a package index: the hint installs what the `flower` extra requires."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["flower"] == [flower_commands.FLOWER_REQUIREMENT]
    assert "fedseg[flower]" not in flower_commands.INSTALL_HINT


def test_fedseg_help_does_not_import_flwr() -> None:
    code = "import sys, fedseg.cli.main; print('flwr' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]

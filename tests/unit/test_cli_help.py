"""Every --help reads as plain text: "[required]", never the markup escape "\\[required]"."""

from __future__ import annotations

import pytest
import typer.main

from fedseg.cli.main import app, run


def _command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths = []
    for name, command in root.commands.items():
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


def test_every_help_is_free_of_markup_escapes(capsys: pytest.CaptureFixture) -> None:
    paths = _command_paths()
    assert ["status"] in paths and ["report"] in paths and ["flower", "certs"] in paths
    for path in [[]] + paths:
        assert run([*path, "--help"]) == 0
        text = capsys.readouterr().out
        assert "\\[" not in text, (path, text)
        assert "Example" in text or not path or path == ["flower"], path   # every command shows an example
    assert run(["aggregate", "--help"]) == 0
    assert "plans.json the updates were trained under.  [required]" in capsys.readouterr().out

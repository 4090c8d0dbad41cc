"""What a user of the command line relies on before any training: fast help, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.cli.main import run

COMMANDS = ["synth", "fingerprint", "plan", "init", "train", "aggregate", "predict", "evaluate", "simulate", "inspect"]


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from fedseg.cli.main import run\n"
        "rc = run(['--help'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'fedseg --help imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str, capsys: pytest.CaptureFixture) -> None:
    assert run([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out


def test_missing_dataset_is_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fp.json"
    rc = run(["fingerprint", "--site", "a", "--data", str(tmp_path / "nope"), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "nope" in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_strategy_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fp = tmp_path / "fp.json"
    fp.write_text("{}")
    rc = run(["plan", str(fp), "--strategy", "nosuch", "-o", str(tmp_path / "plans.json")])
    assert rc == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "plans.json").exists()


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert run(["train", "--site"]) == 2


def test_synth_fingerprint_plan_inspect(tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fps = []
    for site in sorted(p.name for p in tiny_sites.iterdir()):
        fp = tmp_path / f"{site}.json"
        assert run(["fingerprint", "--site", site, "--data", str(tiny_sites / site), "-o", str(fp), "--quiet"]) == 0
        fps.append(str(fp))
    plans_path = tmp_path / "plans.json"
    assert run(["plan", *fps, "--strategy", "fedavg", "-o", str(plans_path), "--quiet"]) == 0
    plans = json.loads(plans_path.read_text())
    assert sorted(plans["sites"]) == sorted(p.name for p in tiny_sites.iterdir())
    # the same plan whatever the order of the fingerprints
    plans_rev = tmp_path / "plans_rev.json"
    assert run(["plan", *reversed(fps), "--strategy", "fedavg", "-o", str(plans_rev), "--quiet"]) == 0
    assert json.loads(plans_rev.read_text())["plan_id"] == plans["plan_id"]
    capsys.readouterr()
    assert run(["inspect", str(plans_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["type"] == "plans" and summary["plan_id"] == plans["plan_id"]

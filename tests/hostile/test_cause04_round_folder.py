"""Cause 4: the round is checked against the folder. The output folder's round must be the
updates' round, a complete folder of another round is never written over, and the sites'
`updates/` (or any input) is never an output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hostile_rounds import aggregate, assert_refused, files_of, setup_plan, write_updates

from fedseg.cli.main import run


def test_round_1_updates_into_round_002(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans, plans_path = setup_plan(tmp_path)
    paths = write_updates(plans, tmp_path / "run" / "round_001")
    before = files_of(tmp_path)
    out = tmp_path / "run" / "round_002"
    assert_refused(capsys, aggregate(plans_path, paths.values(), out), out, "round 2, but these are round-1 files")
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("target", ["round_001/updates", "round_001/updates/sub"])
def test_never_into_updates(tmp_path: Path, capsys: pytest.CaptureFixture, target: str) -> None:
    plans, plans_path = setup_plan(tmp_path)
    paths = write_updates(plans, tmp_path / "round_001")
    before = files_of(tmp_path)
    out = tmp_path / target
    assert_refused(capsys, aggregate(plans_path, paths.values(), out), out, "updates/")
    assert files_of(tmp_path) == before


def test_an_input_where_an_output_goes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans, plans_path = setup_plan(tmp_path)
    paths = write_updates(plans, tmp_path / "round_001")
    moved = tmp_path / "round_001" / "A.safetensors"
    shutil.move(paths["A"], moved)
    before = files_of(tmp_path)
    rc = aggregate(plans_path, [moved, paths["B"], paths["C"]], tmp_path / "round_001")
    assert_refused(capsys, rc, moved, "would be overwritten")
    assert files_of(tmp_path) == before


def test_round_2_over_a_complete_round_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder not named round_NNN takes any round once; after that, only its own round."""
    plans, plans_path = setup_plan(tmp_path)
    first = write_updates(plans, tmp_path / "in1", round_index=1)
    second = write_updates(plans, tmp_path / "in2", round_index=2)
    out = tmp_path / "latest"
    assert aggregate(plans_path, first.values(), out) == 0
    capsys.readouterr()
    before = files_of(tmp_path)
    assert_refused(capsys, aggregate(plans_path, second.values(), out), out, "holds a complete round 1")
    # --replace replaces a round by the same round, never by another one
    assert_refused(capsys, aggregate(plans_path, second.values(), out, "--replace"), out, "holds a complete round 1")
    assert files_of(tmp_path) == before


def test_init_only_into_round_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _plans, plans_path = setup_plan(tmp_path)
    out = tmp_path / "round_001"
    assert_refused(capsys, run(["init", "--plans", str(plans_path), "-o", str(out), "-q"]), out, "round 1, but these are round-0")
    assert not out.exists()

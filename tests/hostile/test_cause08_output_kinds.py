"""Outputs of the wrong kind: a file where a folder is written (or the reverse) is refused
before any work, exit 2, one line naming the path, nothing written."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cli_inputs import listing, refused


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder holding one file (`a_file`) and one folder (`a_folder`), the wrong kinds to give."""
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "a_folder").mkdir()
    return tmp_path


# (argv with {file}, {folder}, {plans}, {fp}, {sites} placeholders, the path the error names)
CASES = {
    "fingerprint -o folder": (["fingerprint", "--site", "site_a", "--data", "{sites}/site_a", "-o", "{folder}"], "{folder}"),
    "fingerprint -o below a file": (["fingerprint", "--site", "site_a", "--data", "{sites}/site_a", "-o", "{file}/fp.json"], "{file}"),
    "plan -o folder": (["plan", "{fp}", "-o", "{folder}"], "{folder}"),
    "plan -o below a file": (["plan", "{fp}", "-o", "{file}/sub/plans.json"], "{file}"),
    "init -o file": (["init", "--plans", "{plans}", "-o", "{file}"], "{file}"),
    "init -o below a file": (["init", "--plans", "{plans}", "-o", "{file}/round_000"], "{file}"),
    "aggregate -o file": (["aggregate", "--plans", "{plans}", "{file}", "-o", "{file}"], "{file}"),
    "aggregate --previous file": (["aggregate", "--plans", "{plans}", "{file}", "-o", "{folder}/round_001", "--previous", "{file}"], "{file}"),
    "train -o folder": (["train", "--site", "site_a", "--data", "{sites}/site_a", "--plans", "{plans}", "--weights", "{file}",
                         "--state", "{folder}/state", "-o", "{folder}"], "{folder}"),
    "train --state file": (["train", "--site", "site_a", "--data", "{sites}/site_a", "--plans", "{plans}", "--weights", "{file}",
                            "--state", "{file}", "-o", "{folder}/update.safetensors"], "{file}"),
    "predict -o file": (["predict", "--plans", "{plans}", "--weights", "{file}", "-i", "{folder}", "-o", "{file}"], "{file}"),
    "predict --state file": (["predict", "--plans", "{plans}", "--weights", "{file}", "-i", "{folder}", "-o", "{folder}/pred",
                              "--state", "{file}"], "{file}"),
    "evaluate -o folder": (["evaluate", "--pred", "{folder}", "--ref", "{folder}", "-o", "{folder}"], "{folder}"),
    "keygen -o file": (["keygen", "--site", "site_a", "-o", "{file}"], "{file}"),
    "simulate -o file": (["simulate", "{sites}", "-o", "{file}"], "{file}"),
    "simulate -o below a file": (["simulate", "{sites}", "-o", "{file}/run"], "{file}"),
    "synth into a file": (["synth", "{file}"], "{file}"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_of_the_wrong_kind_is_refused_before_any_work(
    case: str, workdir: Path, tiny_sites: Path, tiny_plans: Path, tiny_fingerprints: list[Path], capsys: pytest.CaptureFixture,
) -> None:
    argv, named = CASES[case]
    values = {"file": str(workdir / "a_file"), "folder": str(workdir / "a_folder"), "plans": str(tiny_plans),
              "fp": str(tiny_fingerprints[0]), "sites": str(tiny_sites)}
    before = listing(workdir)
    refused([arg.format(**values) for arg in argv], capsys, named.format(**values))
    assert listing(workdir) == before
    assert (workdir / "a_file").read_text() == "not a folder\n"


def test_train_refuses_a_folder_output_without_training(
    workdir: Path, tiny_sites: Path, tiny_plans: Path, capsys: pytest.CaptureFixture,
) -> None:
    """The update path is checked first: no state folder, no cache, and well under a second of
    work (a round of training takes far longer)."""
    start = time.monotonic()
    refused(["train", "--site", "site_a", "--data", str(tiny_sites / "site_a"), "--plans", str(tiny_plans),
             "--weights", str(workdir / "a_file"), "--state", str(workdir / "state"), "-o", str(workdir / "a_folder")],
            capsys, "a_folder", "update file")
    assert time.monotonic() - start < 5
    assert not (workdir / "state").exists()


def test_right_kinds_still_pass_the_check(workdir: Path, tiny_fingerprints: list[Path], capsys: pytest.CaptureFixture) -> None:
    from fedseg.cli.main import run

    out = workdir / "new" / "deeper" / "plans.json"   # missing parents are created
    assert run(["plan", *map(str, tiny_fingerprints), "-o", str(out), "-q"]) == 0
    assert out.is_file()
    assert run(["init", "--plans", str(out), "-o", str(workdir / "a_folder" / "round_000"), "-q"]) == 0
    assert sorted(p.name for p in (workdir / "a_folder" / "round_000").glob("*.safetensors")) == [
        "site_a.safetensors", "site_b.safetensors", "site_c.safetensors"]

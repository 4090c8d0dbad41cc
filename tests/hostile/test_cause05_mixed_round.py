"""Cause 5: a round's outputs become visible together or not at all.

Outputs are staged in `<round>/.incoming/` and committed with `aggregate.json`, the record of
every output's sha256 (fedseg.federation.round_commit). The disk fills at every write of an
aggregation in turn: the round folder stays the old round, byte for byte. The process dies at
every step of the commit: readers refuse the folder until the next writer finishes it, and
then it is the new round. Same inputs: nothing changes; other inputs: refused unless --replace.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
from pathlib import Path

import pytest
from hostile_rounds import aggregate, assert_refused, files_of, random_state, setup_plan, write_site_update, write_updates

from fedseg.cli.main import run
from fedseg.errors import InputError
from fedseg.federation import round_commit
from fedseg.federation.round_commit import check_committed
from fedseg.federation.weightfile import WeightMeta, sha256_file, write_weight_file


def other_updates(plans, folder: Path) -> dict[str, Path]:
    """Round-1 updates with other weights than `write_updates` gives."""
    paths = {}
    for i, site in enumerate(sorted(plans.sites)):
        paths[site] = folder / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, random_state(20 + i), paths[site], round_index=1, n_iterations=10)
    return paths


def outputs(folder: Path) -> dict[str, bytes]:
    """The round's files, except the record (it names the input paths, which differ by folder)."""
    return {k: v for k, v in files_of(folder).items() if k != "aggregate.json" and not k.startswith("updates/")}


@pytest.fixture
def rounds(tmp_path: Path, capsys: pytest.CaptureFixture):
    """A complete round_001 from the old updates, and the new round's files (made elsewhere)."""
    plans, plans_path = setup_plan(tmp_path)
    old_inputs = write_updates(plans, tmp_path / "old")
    new_inputs = other_updates(plans, tmp_path / "new")
    out = tmp_path / "round_001"
    assert aggregate(plans_path, old_inputs.values(), out) == 0
    reference = tmp_path / "reference" / "round_001"
    assert aggregate(plans_path, new_inputs.values(), reference) == 0
    capsys.readouterr()
    return plans_path, old_inputs, new_inputs, out, outputs(reference)


def test_same_inputs_change_nothing(rounds, capsys: pytest.CaptureFixture) -> None:
    plans_path, old_inputs, _new, out, _reference = rounds
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    assert aggregate(plans_path, old_inputs.values(), out) == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == before


def _as_older_record(out: Path, sha256_of_a: str | None = None) -> None:
    """The round's aggregate.json as written before inputs were named by content hash."""
    path = out / "aggregate.json"
    record = json.loads(path.read_text())
    for item in record["inputs"]:
        item.pop("content_hash", None)
        item["sha256"] = sha256_of_a if sha256_of_a is not None and item["site"] == "A" else sha256_file(item["path"])
    path.write_text(json.dumps(record))


def test_same_inputs_recognised_in_a_record_written_before_content_hashes(rounds, capsys: pytest.CaptureFixture) -> None:
    plans_path, old_inputs, _new, out, _reference = rounds
    _as_older_record(out)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    assert aggregate(plans_path, old_inputs.values(), out) == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == before
    _as_older_record(out, sha256_of_a="0" * 64)   # A's recorded bytes are not these: other inputs
    assert_refused(capsys, aggregate(plans_path, old_inputs.values(), out), out / "aggregate.json", "--replace")


def test_other_inputs_refused_then_replaced_as_a_whole(rounds, capsys: pytest.CaptureFixture) -> None:
    plans_path, _old, new_inputs, out, reference = rounds
    before = files_of(out)
    assert_refused(capsys, aggregate(plans_path, new_inputs.values(), out), out / "aggregate.json", "--replace")
    assert files_of(out) == before
    assert aggregate(plans_path, new_inputs.values(), out, "--replace") == 0
    assert outputs(out) == reference
    record = json.loads((out / "aggregate.json").read_text())
    assert {i["path"] for i in record["inputs"]} == {str(p) for p in new_inputs.values()}
    assert set(record["files"]) == set(reference)


class DiskFull:
    """os.fsync that fails with ENOSPC at the n-th regular file (each atomic write syncs once)."""

    def __init__(self, at: int) -> None:
        self.at, self.count, self.real = at, 0, os.fsync

    def __call__(self, fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            self.count += 1
            if self.count == self.at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)


def test_disk_full_at_every_write_leaves_the_old_round(rounds, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    plans_path, _old, new_inputs, out, reference = rounds
    old = files_of(out)
    for at in itertools.count(1):
        full = DiskFull(at)
        monkeypatch.setattr(os, "fsync", full)
        rc = aggregate(plans_path, new_inputs.values(), out, "--replace")
        monkeypatch.undo()
        if full.count < at:    # this aggregation has fewer writes: every one has failed once
            assert rc == 0
            break
        err = assert_refused(capsys, rc, out, "No space left on device")
        assert round_commit.STAGING_DIR not in err   # names the output, not a temporary file
        assert files_of(out) == old, f"disk full at write {at}"
    # the global model, the record, the journal (the site files are hard links to the global
    # model: no data of their own to sync; their names are synced with the staging folder)
    assert at > 3
    assert outputs(out) == reference


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs, no handler catches it."""


class DiesAtRename:
    """round_commit's `os`, dying at its n-th rename (the steps of a commit)."""

    def __init__(self, at: int) -> None:
        self.at, self.count = at, 0

    def replace(self, source, target) -> None:
        self.count += 1
        if self.count == self.at:
            raise Killed()
        os.replace(source, target)

    def __getattr__(self, name: str):
        return getattr(os, name)


def test_killed_at_every_commit_step(rounds, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    plans_path, _old, new_inputs, out, reference = rounds
    old = outputs(out)
    for at in itertools.count(1):
        dies = DiesAtRename(at)
        monkeypatch.setattr(round_commit, "os", dies)
        try:
            rc = aggregate(plans_path, new_inputs.values(), out, "--replace")
        except Killed:
            rc = None
        monkeypatch.undo()
        if rc is not None:
            assert rc == 0 and dies.count < at
            break
        if at == 1:   # died before the decision: the old round, untouched
            assert outputs(out) == old and not (out / round_commit.COMMIT_DIR).exists()
        else:         # died after it: readers refuse the half-moved round...
            with pytest.raises(InputError, match="unfinished commit"):
                check_committed(out / "A.safetensors")
            # ...and the next writer of the round finishes it: the new round, whole
            assert aggregate(plans_path, new_inputs.values(), out) == 0
            assert outputs(out) == reference
            assert aggregate(plans_path, _old.values(), out, "--replace") == 0   # back to the old round
        capsys.readouterr()
    assert at > 4


def test_readers_trust_only_what_the_record_lists(rounds, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans_path, _old, _new, out, _reference = rounds
    from fedseg.federation.weightfile import read_weight_file

    tensors, meta = read_weight_file(out / "A.safetensors")
    tensors = {k: v + 1 for k, v in tensors.items()}
    swapped = out / ".swap"
    write_weight_file(swapped, tensors, WeightMeta(**{**meta.__dict__, "content_hash": ""}))
    os.replace(swapped, out / "A.safetensors")   # a valid model file, but not the round's
    state, update = tmp_path / "state", tmp_path / "update.safetensors"
    rc = run(["train", "--site", "A", "--data", str(tmp_path), "--plans", str(plans_path),
              "--weights", str(out / "A.safetensors"), "--state", str(state), "-o", str(update), "-q"])
    assert_refused(capsys, rc, out / "A.safetensors", "differs from the sha256 that aggregate.json")
    assert not state.exists() and not update.exists()


def test_every_atomic_write_reports_a_full_disk_by_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same mapping serves `train` (update, local state, checkpoint) and `init`."""
    from fedseg.atomic import write_bytes_atomic

    target = tmp_path / "update.safetensors"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", DiskFull(1))
    with pytest.raises(InputError, match="No space left on device") as caught:
        write_bytes_atomic(target, b"new")
    assert caught.value.path == target
    assert files_of(tmp_path) == {"update.safetensors": b"old"}   # no temporary file left either

"""Locks: two `aggregate` of one round, or two `train` with one site state folder, never
interleave. The second stops at once (exit 2, "in use by pid N"); a lock left by a killed
process blocks nobody."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_rounds import aggregate, assert_refused, files_of, setup_plan, write_updates

from fedseg.cli.main import run
from fedseg.folder_lock import LOCK_FILE

HOLD = """
import sys, time
from fedseg.folder_lock import folder_lock
with folder_lock(sys.argv[1], "folder"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock (as a running aggregate or train would)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=os.environ)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_aggregate_of_a_round(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans, plans_path = setup_plan(tmp_path)
    paths = write_updates(plans, tmp_path / "round_001")
    out = tmp_path / "round_001"
    holder = hold_lock(out)
    try:
        before = files_of(tmp_path)
        assert_refused(capsys, aggregate(plans_path, paths.values(), out), out, f"in use by pid {holder.pid}")
        assert files_of(tmp_path) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder never removed its lock file; the kernel released the lock itself
    assert (out / LOCK_FILE).exists()
    assert aggregate(plans_path, paths.values(), out) == 0
    assert (out / "aggregate.json").is_file() and not (out / LOCK_FILE).exists()


def test_second_train_with_one_state_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans, plans_path = setup_plan(tmp_path)
    paths = write_updates(plans, tmp_path / "round_001")
    assert aggregate(plans_path, paths.values(), tmp_path / "round_001") == 0
    state, update = tmp_path / "state_A", tmp_path / "round_002" / "updates" / "A.safetensors"
    holder = hold_lock(state)
    try:
        rc = run(["train", "--site", "A", "--data", str(tmp_path), "--plans", str(plans_path),
                  "--weights", str(tmp_path / "round_001" / "A.safetensors"), "--state", str(state), "-o", str(update), "-q"])
        assert_refused(capsys, rc, state, f"site state folder is in use by pid {holder.pid}")
        assert not update.exists() and files_of(state) == {LOCK_FILE: f"{holder.pid}\n".encode()}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

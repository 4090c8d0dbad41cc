"""A round's outputs become visible together or not at all.

A round folder (`round_000/` from init, `round_r/` from aggregate) holds several files that
only make sense together: what each site loads next, the pool models, their signatures and
the record (`init.json` / `aggregate.json`). Writing them one by one in place would let a
full disk or a kill leave new files beside an old record, which a site would then load.

Why staging + a commit record, and not one folder renamed into place: the round folder also
holds `updates/`, which the sites write before the coordinator aggregates, so the round
folder itself cannot be swapped. Instead:

1. everything is written into `<round>/.incoming/` (same file system), the record last; the
   record lists every output with its sha256 (`files`);
2. `.incoming/` is renamed to `.commit/` — the single atomic step at which the new round is
   decided (a failure before it leaves the old round untouched; `.incoming/` is discarded);
3. the old record is removed (the round is not complete for a moment), the new files are
   renamed into place, files of the replaced round that the new one lacks are removed, and
   the new record is renamed into place last. Renames need no disk space, and the step is
   idempotent: a process killed in the middle leaves `.commit/`, which the next writer of
   the round (or `simulate --resume`) finishes before anything else.

Readers (`train`, `predict`, the next `aggregate` via `--previous`, `simulate`) trust a file
of a round folder only when the folder's record lists it with the same sha256 and no commit
is pending (`check_committed`). Every step runs under the round folder's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.atomic import write_json_atomic
from fedseg.errors import InputError
from fedseg.federation.weightfile import sha256_file
from fedseg.names import path_inside

STAGING_DIR = ".incoming"
COMMIT_DIR = ".commit"
JOURNAL_FILE = "commit.json"      # inside COMMIT_DIR: which record, which old files to remove
INIT_RECORD = "init.json"
AGGREGATE_RECORD = "aggregate.json"
RECORD_NAMES = (INIT_RECORD, AGGREGATE_RECORD)
UPDATES_DIR = "updates"


def read_record(folder: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(record file name, its content) of a committed round folder; None when it has none."""
    for name in RECORD_NAMES:
        path = Path(folder) / name
        if path.is_file():
            try:
                body = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"not a valid round record ({exc})", path) from None
            if not isinstance(body, dict):
                raise InputError("not a valid round record (not a JSON object)", path)
            return name, body
    return None


def record_files(record: dict[str, Any]) -> dict[str, str]:
    """{relative path: sha256} of every file a round record vouches for.

    Records written before `files` existed list their weight files under `outputs`."""
    files = record.get("files")
    if isinstance(files, dict):
        return {str(k): str(v) for k, v in files.items()}
    outputs = record.get("outputs")
    if not isinstance(outputs, list):
        return {}
    return {str(o["path"]): str(o["sha256"]) for o in outputs if isinstance(o, dict) and "path" in o and "sha256" in o}


def damaged_files(folder: str | Path, record: dict[str, Any]) -> list[str]:
    """The files a record lists that are missing or whose sha256 differs."""
    bad = []
    for rel, digest in sorted(record_files(record).items()):
        path = _inside(folder, rel)
        if path is None or not path.is_file() or sha256_file(path) != digest:
            bad.append(rel)
    return bad


def _inside(folder: str | Path, rel: str) -> Path | None:
    """`folder/rel` when it stays inside `folder` (a record is a file like any other: it may lie)."""
    try:
        return path_inside(folder, *rel.split("/"))
    except InputError:
        return None


def round_folder_of(path: Path) -> Path:
    """The round folder a weight file lies in (`round_r/x.safetensors`, `round_r/models/x.safetensors`)."""
    parent = path.parent
    return parent.parent if parent.name == "models" else parent


def check_committed(path: str | Path) -> None:
    """Refuse a weight file of a round folder that its commit record does not vouch for.

    A file outside any round folder (no record beside it) is accepted as it is: its content
    hash and signature are checked when it is read."""
    path = Path(path)
    folder = round_folder_of(path)
    if (folder / COMMIT_DIR).is_dir():
        raise InputError(
            f"its round folder {folder} has an unfinished commit; run the same `fedseg aggregate` (or `init`) again to finish it",
            path,
        )
    found = read_record(folder)
    if found is None:
        return
    name, record = found
    rel = path.relative_to(folder).as_posix()
    listed = record_files(record).get(rel)
    if listed is None:
        raise InputError(f"is not one of the outputs {name} of its round folder lists", path)
    if sha256_file(path) != listed:
        raise InputError(f"differs from the sha256 that {name} of its round folder records (changed after the round was written)", path)


@dataclass
class RoundStage:
    """Staged outputs of one round: write to `path(rel)`, then `commit`."""

    out_dir: Path
    root: Path

    def path(self, rel: str) -> Path:
        return path_inside(self.root, *rel.split("/"))

    def final(self, staged: Path) -> Path:
        """Where a staged file will live once committed (what error messages name)."""
        try:
            return self.out_dir / staged.relative_to(self.root)
        except ValueError:
            return staged

    def commit(self, record_name: str, record: dict[str, Any], known: dict[str, str] | None = None) -> dict[str, Any]:
        """Write the record (with `files`: sha256 of every staged file) and make the round visible.

        `known`: sha256 already computed while writing (relative path -> digest)."""
        files = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(self.root).as_posix()
            files[rel] = (known or {}).get(rel) or sha256_file(path)
        record = {**record, "files": files}
        write_json_atomic(self.path(record_name), record)
        old = read_record(self.out_dir)
        obsolete = sorted(rel for rel in set(record_files(old[1])) - set(files) if _inside(self.out_dir, rel)) if old else []
        stale_records = [name for name in RECORD_NAMES if name != record_name and (self.out_dir / name).exists()]
        write_json_atomic(self.root / JOURNAL_FILE, {"record": record_name, "obsolete": obsolete + stale_records})
        _fsync_dir(self.root)
        os.replace(self.root, self.out_dir / COMMIT_DIR)   # the decision: from here on, the new round
        finish_commit(self.out_dir)
        return record


@contextlib.contextmanager
def staged_round(out_dir: str | Path) -> Iterator[RoundStage]:
    """A fresh staging folder inside `out_dir` (the caller holds the round folder's lock).

    On any failure the staging folder is removed, so the round folder keeps its old content;
    a write the user can fix (disk full, read-only) is reported under the output's real name.
    """
    out_dir = Path(out_dir)
    finish_commit(out_dir)
    stage = RoundStage(out_dir, out_dir / STAGING_DIR)
    shutil.rmtree(stage.root, ignore_errors=True)    # a staging folder left by a killed writer
    stage.root.mkdir(parents=True)
    try:
        yield stage
    except InputError as exc:
        if exc.path is not None and stage.root in exc.path.parents:
            raise InputError(exc.detail, stage.final(exc.path)) from exc
        raise
    finally:
        shutil.rmtree(stage.root, ignore_errors=True)


def finish_commit(out_dir: str | Path) -> bool:
    """Complete a commit that a killed process left half done; True when there was one."""
    out_dir = Path(out_dir)
    pending = out_dir / COMMIT_DIR
    if not pending.is_dir():
        return False
    journal_path = pending / JOURNAL_FILE
    try:
        journal = json.loads(journal_path.read_text(encoding="utf-8"))
        record_name, obsolete = journal["record"], list(journal["obsolete"])
        if record_name not in RECORD_NAMES:
            raise ValueError(f"unknown record {record_name!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"is not an unfinished fedseg commit ({exc}); remove it by hand", pending) from None
    try:
        _roll_forward(out_dir, pending, record_name, obsolete)
    except OSError as exc:   # renames need no space, but a folder (models/) may
        raise InputError(
            f"cannot finish committing the round ({exc.strerror or exc}); fix that and run the same command again", out_dir,
        ) from exc
    return True


def _roll_forward(out_dir: Path, pending: Path, record_name: str, obsolete: list[str]) -> None:
    new_record = pending / record_name
    if new_record.is_file():
        with contextlib.suppress(FileNotFoundError):
            (out_dir / record_name).unlink()      # the old round stops being complete first
        for path in sorted(p for p in pending.rglob("*") if p.is_file()):
            rel = path.relative_to(pending).as_posix()
            if rel in (JOURNAL_FILE, record_name):
                continue
            target = path_inside(out_dir, *rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        for rel in obsolete:
            with contextlib.suppress(FileNotFoundError):
                path_inside(out_dir, *rel.split("/")).unlink()
        _fsync_dir(out_dir)
        os.replace(new_record, out_dir / record_name)   # the new round is complete
        _fsync_dir(out_dir)
    shutil.rmtree(pending)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):   # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------
# which folder a round may be written to
# ---------------------------------------------------------------------------------------
def round_number_of(folder: str | Path) -> int | None:
    """r for a folder named `round_r` (any number of digits), else None."""
    name = Path(folder).name
    digits = name[len("round_"):]
    return int(digits) if name.startswith("round_") and digits.isdigit() and digits.isascii() else None


def check_output_folder(out_dir: str | Path, inputs: list[str | Path] | tuple[str | Path, ...] = ()) -> None:
    """Refuse an output folder that would overwrite what the sites sent.

    `updates/` belongs to the sites (each writes its update there before the round is
    aggregated); and an input lying where an output goes would be overwritten by it."""
    out_dir = Path(out_dir)
    if UPDATES_DIR in (out_dir.name, out_dir.parent.name):
        raise InputError(
            f"lies in an {UPDATES_DIR}/ folder, which holds the sites' own files; write the round to the folder above it",
            out_dir,
        )
    output_folders = {out_dir.resolve(), (out_dir / "models").resolve()}
    for path in inputs:
        if Path(path).resolve().parent in output_folders:
            raise InputError(
                f"lies where the round's outputs go ({out_dir}) and would be overwritten; keep updates in "
                f"{out_dir}/{UPDATES_DIR}/",
                path,
            )


def check_round_number(out_dir: str | Path, round_index: int, record_name: str) -> None:
    """The round a folder is named for, and the round it already holds, must be `round_index`."""
    out_dir = Path(out_dir)
    named = round_number_of(out_dir)
    if named is not None and named != round_index:
        raise InputError(
            f"is the folder of round {named}, but these are round-{round_index} files; use round_{round_index:03d}",
            out_dir,
        )
    found = read_record(out_dir)
    if found is not None:
        name, record = found
        held = 0 if name == INIT_RECORD else record.get("round")
        if name != record_name or held != round_index:
            raise InputError(
                f"holds a complete round {held}; round {round_index} goes into a folder of its own (round_{round_index:03d})",
                out_dir,
            )

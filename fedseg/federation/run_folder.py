"""The run folder of a federation and its chain of rounds (ARCHITECTURE.md §6).

Run folder: plans.json, fingerprints/, round_000/, round_r/updates/, round_r/<site>.safetensors,
round_r/models/, round_r/aggregate.json, state/<site>/, report/. A round is complete when its
commit record (round_000/init.json, round_r/aggregate.json) lists its outputs with their
sha256. Started again on the same folder, a run checks the chain of rounds (each round's
updates are the ones its record names, by their verified content hash, and started from the
previous round's outputs, by sha256; each record's files are intact)
and redoes everything from the first round that is not complete or not linked, discarding the
rounds after it and putting each site's state back to where that round started
(state/<site>/before_round/<r>/).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from fedseg.errors import InputError
from fedseg.federation.aggregate_records import is_recorded_input
from fedseg.federation.round_commit import (
    AGGREGATE_RECORD,
    damaged_files,
    finish_commit,
    read_record,
    record_files,
    round_number_of,
)
from fedseg.federation.site_training import STARTED_FROM
from fedseg.training.site_state import restore_site_state
from fedseg.federation.weightfile import WeightMeta, open_weight_file
from fedseg.folder_lock import folder_lock
from fedseg.names import check_site_name, path_inside

NOT_COMPLETE = "not complete"


def round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round_{r:03d}"


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """Refuse to run into a folder that already holds files unless the caller resumes it.

    `simulate` continues whatever run it finds (complete rounds are skipped); the CLI asks
    for an explicit --resume so that a mistyped -o never mixes two runs, and a resume of a
    folder that is not a run says so.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("run folder exists and is not a folder", run_dir)
    has_files = run_dir.is_dir() and any(run_dir.iterdir())
    if has_files and not resume:
        raise InputError("run folder already holds files; pass --resume to continue that run, or choose a new folder", run_dir)
    if resume and has_files and not (run_dir / "plans.json").is_file():
        raise InputError("--resume: this folder holds files but no plans.json, so it is not a fedseg run", run_dir)


def discover_sites(sites_root: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """The site folders under `sites_root` (sub-folders with a dataset.json); `log` hears which
    other sub-folders were skipped, so a site missing its dataset.json is not dropped silently."""
    if not sites_root.is_dir():
        raise InputError("sites folder not found", sites_root)
    # Folders whose name starts with "_" are not sites (e.g. `_server_test`, the server's test set).
    folders = sorted(p for p in sites_root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    sites = [p for p in folders if (p / "dataset.json").is_file()]
    skipped = [p.name for p in folders if p not in sites]
    if skipped and log is not None:
        log(f"skipped {len(skipped)} folder(s) of {sites_root} without a dataset.json: {', '.join(skipped)}")
    if not sites:
        raise InputError("no site folders (sub-folders with a dataset.json) inside", sites_root)
    for site in sites:   # a folder's name becomes the site's name, and file names from it
        check_site_name(site.name, site, what="site folder name")
    return sites


def first_round_to_redo(run_dir: Path, rounds: int, log: Callable[[str], None] = lambda message: None) -> int:
    """The first round (1..rounds) that is not complete and linked to the round before it;
    rounds + 1 when every round is. Round 0 is checked by `plan_and_init`."""
    previous = read_record(round_dir(run_dir, 0))
    for r in range(1, rounds + 1):
        problem = round_chain_problem(run_dir, r, previous[1] if previous else None)
        if problem is not None:
            if problem != NOT_COMPLETE or any(round_dir(run_dir, k).exists() for k in range(r + 1, rounds + 1)):
                log(f"round {r}: {problem}")
            return r
        previous = read_record(round_dir(run_dir, r))
    return rounds + 1


def round_chain_problem(run_dir: Path, r: int, previous: dict | None) -> str | None:
    """Why round r cannot be trusted as the successor of `previous` (its record); None when it can."""
    rdir = round_dir(run_dir, r)
    with folder_lock(rdir, "round folder"):
        finish_commit(rdir)
    found = read_record(rdir)
    if found is None or found[0] != AGGREGATE_RECORD:
        return NOT_COMPLETE
    record = found[1]
    if record.get("round") != r:
        return f"its aggregate.json is of round {record.get('round')}"
    damaged = damaged_files(rdir, record)
    if damaged:
        return f"output(s) changed after the round was written: {', '.join(damaged[:3])}"
    previous_files = record_files(previous) if previous is not None else {}
    for item in record.get("inputs", []):
        site = item.get("site")
        update = path_inside(rdir / "updates", f"{site}.safetensors")
        meta = _recorded_update(update, item)
        if meta is None:
            return f"the update of site {site} is not the one aggregate.json records"
        started_from = meta.extra.get(STARTED_FROM)
        if started_from is None or started_from != previous_files.get(f"{site}.safetensors"):
            return f"site {site}'s update did not start from round {r - 1}'s {site}.safetensors"
    return None


def _recorded_update(update: Path, item: dict) -> WeightMeta | None:
    """The metadata of an update file when it is the input `item` of a round record names (its
    content hash verified); None when it is not (missing, unreadable, altered, another file)."""
    if not update.is_file():
        return None
    try:
        with open_weight_file(update) as reader:
            reader.verify_hash()
            return reader.meta if is_recorded_input(item, reader.meta.content_hash, reader.file_sha256) else None
    except InputError:
        return None


def discard_rounds_from(run_dir: Path, first: int, sites: list[str], log: Callable[[str], None] = lambda message: None) -> None:
    """Remove round folders first.. and put each site's state back to where round `first` started."""
    later = sorted(p for p in run_dir.glob("round_*") if (round_number_of(p) or 0) >= first)
    # a round interrupted before its commit is simply redone; anything beyond it is said aloud
    if any(round_number_of(p) != first or read_record(p) is not None for p in later):
        log(f"redoing from round {first}: discarding {', '.join(p.name for p in later)}")
    for folder in later:
        shutil.rmtree(folder)
    for site in sites:
        restore_site_state(path_inside(run_dir / "state", site), first)

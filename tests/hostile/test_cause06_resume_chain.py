"""Cause 6: `simulate --resume` verifies the chain of rounds (each round's updates are the
ones its record names, by their verified content hash, or by sha256 in records written
before; each started from the previous round's outputs, by sha256; every record's files
intact) and redoes from
the first broken round, discarding what follows and putting each site's state back to where
that round started, saying so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hostile_rounds import make_plans, random_state, write_site_update

from fedseg.atomic import write_bytes_atomic
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.round_commit import INIT_RECORD, staged_round
from fedseg.federation.run_folder import discard_rounds_from, first_round_to_redo, round_dir
from fedseg.federation.site_training import STARTED_FROM
from fedseg.training.site_state import LOCAL_STATE_FILE, snapshot_site_state
from fedseg.federation.weightfile import WeightMeta, sha256_file, write_weight_file

ROUNDS = 3


def state_after(r: int) -> bytes:
    return f"local state after round {r}".encode()


def build_run(run_dir: Path, plans, seed: int = 0) -> None:
    """A finished run of ROUNDS rounds as `simulate` leaves it, without training."""
    with staged_round(round_dir(run_dir, 0)) as stage:
        for site in sorted(plans.sites):
            state = {k: v for k, v in random_state(seed).items() if v.dtype == np.float32}
            meta = WeightMeta(kind="model", plan_id=plans.plan_id, strategy="fedavg", site=site, round=0,
                              n_cases=plans.sites[site].n_cases, n_iterations=0, scopes={k: "global" for k in state})
            write_weight_file(stage.path(f"{site}.safetensors"), state, meta)
        stage.commit(INIT_RECORD, {"round": 0, "plan_id": plans.plan_id, "seed": seed})
    for r in range(1, ROUNDS + 1):
        run_round(run_dir, plans, r, seed)


def run_round(run_dir: Path, plans, r: int, seed: int = 0, replace: bool = False) -> None:
    paths = []
    for i, site in enumerate(sorted(plans.sites)):
        state_dir = run_dir / "state" / site
        snapshot_site_state(state_dir, r)
        started = sha256_file(round_dir(run_dir, r - 1) / f"{site}.safetensors")
        path = round_dir(run_dir, r) / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, random_state(100 * r + 10 * seed + i), path, round_index=r, n_iterations=1,
                          extra={STARTED_FROM: started})
        write_bytes_atomic(state_dir / LOCAL_STATE_FILE, state_after(r))   # as save_local_state: by rename
        paths.append(path)
    aggregate_round(plans, paths, round_dir(run_dir, r), replace=replace)


@pytest.fixture
def run_dir(tmp_path: Path):
    plans = make_plans()
    build_run(tmp_path / "run", plans)
    return tmp_path / "run", plans


def redo_point(run_dir: Path) -> tuple[int, list[str]]:
    said: list[str] = []
    return first_round_to_redo(run_dir, ROUNDS, said.append), said


def test_an_intact_chain_is_kept(run_dir) -> None:
    run, _plans = run_dir
    assert redo_point(run) == (ROUNDS + 1, [])


def test_round_2_record_removed(run_dir) -> None:
    """The reproduction: round_002/aggregate.json removed from a finished run."""
    run, plans = run_dir
    (round_dir(run, 2) / "aggregate.json").unlink()
    first, said = redo_point(run)
    assert first == 2 and said == ["round 2: not complete"]
    discard_rounds_from(run, first, sorted(plans.sites), said.append)
    assert said[-1] == "redoing from round 2: discarding round_002, round_003"
    assert not round_dir(run, 2).exists() and not round_dir(run, 3).exists()
    assert (round_dir(run, 1) / "aggregate.json").is_file()
    for site in plans.sites:   # each site starts round 2 again from its state after round 1
        assert (run / "state" / site / LOCAL_STATE_FILE).read_bytes() == state_after(1)


def test_an_output_changed_after_its_round(run_dir) -> None:
    run, _plans = run_dir
    target = round_dir(run, 1) / "models" / "global.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.unlink()   # the site files are links to it: change this one only
    target.write_bytes(bytes(data))
    first, said = redo_point(run)
    assert first == 1 and "changed after the round was written: models/global.safetensors" in said[0]


def test_an_update_swapped_after_aggregation(run_dir) -> None:
    run, plans = run_dir
    update = round_dir(run, 2) / "updates" / "B.safetensors"
    write_site_update(plans, "B", random_state(7), update, round_index=2, n_iterations=1,
                      extra={STARTED_FROM: sha256_file(round_dir(run, 1) / "B.safetensors")})
    first, said = redo_point(run)
    assert first == 2 and "update of site B is not the one aggregate.json records" in said[0]


def test_an_update_byte_flipped_after_aggregation(run_dir) -> None:
    """The header (and the content hash it states) unchanged, one tensor byte not: the content
    hash is verified against the data, not only compared with the record."""
    run, _plans = run_dir
    update = round_dir(run, 2) / "updates" / "B.safetensors"
    data = bytearray(update.read_bytes())
    data[-3] ^= 0x01
    update.write_bytes(bytes(data))
    first, said = redo_point(run)
    assert first == 2 and "update of site B is not the one aggregate.json records" in said[0]


def _as_older_record(run: Path, r: int, sha256_of_b: str | None = None) -> None:
    """Round r's aggregate.json as written before inputs were named by content hash."""
    path = round_dir(run, r) / "aggregate.json"
    record = json.loads(path.read_text())
    for item in record["inputs"]:
        item.pop("content_hash", None)
        item["sha256"] = sha256_file(item["path"]) if sha256_of_b is None or item["site"] != "B" else sha256_of_b
    path.write_text(json.dumps(record))


def test_records_written_before_content_hashes_named_inputs_still_chain(run_dir) -> None:
    run, _plans = run_dir
    _as_older_record(run, 2)
    assert redo_point(run) == (ROUNDS + 1, [])
    _as_older_record(run, 2, sha256_of_b="0" * 64)
    first, said = redo_point(run)
    assert first == 2 and "update of site B is not the one aggregate.json records" in said[0]


def test_a_round_redone_under_a_later_one(run_dir) -> None:
    """Round 1 replaced after round 2 was made: round 2 no longer follows from it."""
    run, plans = run_dir
    run_round(run, plans, 1, seed=5, replace=True)
    first, said = redo_point(run)
    assert first == 2 and "did not start from round 1's A.safetensors" in said[0]
    record = json.loads((round_dir(run, 1) / "aggregate.json").read_text())
    assert record["round"] == 1

"""Quorum (plan parameter min_sites): too few updates are refused, a quorate round records and rejoins the missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_federation_engine import FLOAT_NAMES, make_plans, random_state, write_updates
from test_federation_validation_cli import assert_refused

from fedseg.cli.main import run
from fedseg.errors import InputError
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.site_update import compose_site_state, write_site_update
from fedseg.federation.plan_building import attach_manifests
from fedseg.federation.quorum import required_sites
from fedseg.federation.strategies import get_strategy
from fedseg.federation.weightfile import read_weight_file


def aggregate_cli(plans, tmp_path: Path, updates: dict[str, Path], out: Path, *extra: str) -> int:
    plans_path = tmp_path / "plans.json"
    plans.save(plans_path)
    return run(["aggregate", "--plans", str(plans_path), *map(str, updates.values()), "-o", str(out), *extra])


def test_default_quorum_is_every_site_and_refuses_a_missing_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans = make_plans()
    assert required_sites(plans) == 3
    updates = write_updates(plans, tmp_path, sites=["A", "C"])
    out = tmp_path / "round_001"
    rc = aggregate_cli(plans, tmp_path, updates, out, "-q")
    assert_refused(capsys, rc, "missing: B", "needs 3 (min_sites)")
    assert not out.exists()   # nothing written


def test_min_sites_two_of_three_refuses_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans = make_plans(params={"min_sites": 2})
    updates = write_updates(plans, tmp_path, sites=["C"])
    out = tmp_path / "round_001"
    assert_refused(capsys, aggregate_cli(plans, tmp_path, updates, out, "-q"), "missing: A, B", "1 of 3")
    assert not out.exists()


def test_quorate_round_records_missing_site_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans = make_plans(params={"min_sites": 2})
    updates = write_updates(plans, tmp_path, sites=["A", "C"])
    out = tmp_path / "round_001"
    assert aggregate_cli(plans, tmp_path, updates, out) == 0
    console = capsys.readouterr()
    assert "aggregated without B (quorum held)" in console.out + console.err
    saved = json.loads((out / "aggregate.json").read_text())
    assert saved["missing_sites"] == ["B"]
    assert sorted(i["site"] for i in saved["inputs"]) == ["A", "C"]
    for site in "ABC":   # every site, the missing one included, gets what it loads next
        _tensors, meta = read_weight_file(out / f"{site}.safetensors")
        assert meta.kind == "model" and meta.round == 1


def test_missing_site_rejoins_next_round(tmp_path: Path) -> None:
    plans = make_plans(params={"min_sites": 2})
    round1 = tmp_path / "round_001"
    aggregate_round(plans, list(write_updates(plans, tmp_path / "u1", sites=["A", "C"]).values()), round1)
    # B missed round 1: it starts round 2 from round_001/B.safetensors like everybody else
    state = compose_site_state(plans, "B", round1 / "B.safetensors", random_state(9))
    global_model, _ = read_weight_file(round1 / "models" / "global.safetensors")
    for name in FLOAT_NAMES:
        np.testing.assert_array_equal(state[name], global_model[name])
    paths = []
    for i, site in enumerate("ABC"):
        path = tmp_path / "u2" / f"{site}.safetensors"
        start = compose_site_state(plans, site, round1 / f"{site}.safetensors", random_state(i + 1))
        write_site_update(plans, site, {k: (v + 0.5 if k in FLOAT_NAMES else v) for k, v in start.items()}, path, round_index=2, n_iterations=10)
        paths.append(path)
    report = aggregate_round(plans, paths, tmp_path / "round_002", expected_round=2)
    assert report.missing_sites == []
    assert sorted(i.site for i in report.inputs) == ["A", "B", "C"]


def test_min_sites_values_are_checked() -> None:
    strategy = get_strategy("fedavg")
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(InputError, match="min_sites must be a positive integer"):
            strategy.check_params({"min_sites": bad})
    with pytest.raises(InputError, match="min_sites=4 exceeds the plan's 3 site"):
        attach_manifests(make_plans(params={"min_sites": 4}))

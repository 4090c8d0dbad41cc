"""Cause 1: a name becomes a path. Every site name follows one rule, checked by the first
command that sees it; every path built from a name stays inside its folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hostile_rounds import assert_refused, files_of, make_plans, rewrite, setup_plan, write_updates

from fedseg.cli.main import run
from fedseg.errors import InputError
from fedseg.names import check_site_name, is_site_name, path_inside

HOSTILE = ["../../PWNED", "a/b", "x" * 300, ".hidden", "-rf", "a..b", "", "a b", "a\\b", "é"]


@pytest.mark.parametrize("name", ["site_a", "A", "hospital-3.mri", "x" * 64])
def test_ordinary_names_pass(name: str) -> None:
    assert is_site_name(name) and check_site_name(name) == name


@pytest.mark.parametrize("name", [*HOSTILE, "x" * 65, None, 3])
def test_the_rule_refuses(name) -> None:
    assert not is_site_name(name)
    with pytest.raises(InputError, match="not allowed"):
        check_site_name(name, "source.json")


@pytest.mark.parametrize("name", HOSTILE)
def test_fingerprint_refuses_the_name_before_reading(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    out = tmp_path / "fp" / "site.json"
    rc = run(["fingerprint", "--site", name, "--data", str(tmp_path / "nowhere"), "-o", str(out), "-q"])
    assert_refused(capsys, rc, "--site", "not allowed")
    assert files_of(tmp_path) == {}


@pytest.mark.parametrize("name", ["../../PWNED", "a/b"])
def test_keygen_refuses(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    rc = run(["keygen", "--site", name, "-o", str(tmp_path / "keys"), "-q"])
    assert_refused(capsys, rc, "", "not allowed")
    assert files_of(tmp_path) == {} and not (tmp_path / "PWNED.key").exists()


@pytest.fixture(scope="module")
def fingerprint_body(tiny_sites: Path) -> dict:
    from fedseg.data.dataset import load_dataset
    from fedseg.planning.fingerprint import compute_fingerprint

    return compute_fingerprint(load_dataset(next(p for p in sorted(tiny_sites.iterdir()) if p.is_dir())), "site_a")


@pytest.mark.parametrize("name", ["../../PWNED", "x" * 300])
def test_plan_refuses_a_fingerprint_site_field(tmp_path: Path, capsys: pytest.CaptureFixture, fingerprint_body: dict, name: str) -> None:
    fp = tmp_path / "evil.json"
    fp.write_text(json.dumps({**fingerprint_body, "site": name}))
    out = tmp_path / "plans.json"
    rc = run(["plan", str(fp), "--strategy", "fedavg", "-o", str(out), "-q"])
    assert_refused(capsys, rc, fp, "not allowed")
    assert not out.exists()


def test_init_refuses_a_plans_site_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plans = make_plans(sites={"../../PWNED": 3, "B": 4})
    plans_path = run_dir / "plans.json"
    plans.save(plans_path)   # as an attacker would: the plan_id matches the content
    rc = run(["init", "--plans", str(plans_path), "-o", str(run_dir / "round_000"), "-q"])
    assert_refused(capsys, rc, plans_path, "not allowed")
    assert files_of(tmp_path) == {"run/plans.json": plans_path.read_bytes()}


def test_aggregate_refuses_an_update_site_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plans, plans_path = setup_plan(tmp_path)
    paths = write_updates(plans, tmp_path / "round_001")
    evil = paths["C"]
    rewrite(evil, site="../../PWNED")   # a valid file, content hash and all, from a hostile site
    before = files_of(tmp_path)
    rc = run(["aggregate", "--plans", str(plans_path), *map(str, paths.values()), "-o", str(tmp_path / "round_001"), "-q"])
    assert_refused(capsys, rc, evil, "not allowed")
    assert files_of(tmp_path) == before


def test_simulate_refuses_a_site_folder_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sites = tmp_path / "sites"
    (sites / "bad..name").mkdir(parents=True)
    (sites / "bad..name" / "dataset.json").write_text("{}")
    before = files_of(tmp_path)
    rc = run(["simulate", str(sites), "--strategy", "fedavg", "--rounds", "1", "-o", str(tmp_path / "run"), "-q"])
    assert_refused(capsys, rc, sites / "bad..name", "not allowed")
    assert files_of(tmp_path) == before and not (tmp_path / "run").exists()


def test_paths_from_names_stay_inside(tmp_path: Path) -> None:
    folder = tmp_path / "round_001"
    folder.mkdir()
    assert path_inside(folder, "A.safetensors") == folder / "A.safetensors"
    assert path_inside(folder, "models", "global.safetensors") == folder / "models" / "global.safetensors"
    for escape in (("..", "x"), ("../../PWNED.safetensors",), ("/etc/passwd",), (".",)):
        with pytest.raises(InputError, match="outside"):
            path_inside(folder, *escape)
    # a link planted inside the folder cannot lead out of it either
    os.symlink(tmp_path, folder / "link")
    with pytest.raises(InputError, match="outside"):
        path_inside(folder, "link", "x.safetensors")

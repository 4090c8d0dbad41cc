"""Hostile numbers: every number read from another site is bounded at read time (weight file
metadata, fingerprints), so no arithmetic on it can overflow. The files here carry a VALID
content hash over the hostile value: only the bound refuses them.

Each case: exit 2, one line naming the file, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from weight_forgery import assert_refused, federation, listing, make_plans, rewrite, round_model, write_updates

from fedseg.cli.main import run

HUGE = 10**400   # a valid JSON integer; float(HUGE) raises OverflowError


def _aggregate(plans_path: Path, updates: dict[str, Path], out: Path) -> int:
    return run(["aggregate", "--plans", str(plans_path), *map(str, updates.values()), "-o", str(out), "-q"])


UPDATE_FAULTS = {
    "n_cases 10^400": (dict(n_cases=HUGE), "'n_cases' is invalid: expected an integer from 0 to 10,000,000"),
    "n_cases 10^308": (dict(n_cases=10**308), "'n_cases'"),
    "n_cases above 10^7": (dict(n_cases=10_000_001), "'n_cases'"),
    "round 10^400": (dict(round=HUGE), "'round' is invalid: expected an integer from 0 to 1,000,000, got an integer of 401 digits"),
    "n_iterations 10^400": (dict(n_iterations=HUGE), "'n_iterations'"),
    "n_iterations negative": (dict(n_iterations=-1), "'n_iterations'"),
    "extra inf": (dict(extra={"val_dice": float("inf")}), "non-finite number"),
    "extra NaN nested": (dict(extra={"metrics": [{"loss": float("nan")}]}), "non-finite number"),
    "extra 10^400": (dict(extra={"val_dice": HUGE}), "beyond ±2^53"),
}


@pytest.mark.parametrize("robust", [None, "median"])
@pytest.mark.parametrize("case", sorted(UPDATE_FAULTS))
def test_aggregate_bounds_update_numbers(tmp_path: Path, capsys: pytest.CaptureFixture, case: str, robust: str | None) -> None:
    _plans, plans_path, updates = federation(tmp_path, {"robust": robust} if robust else None)
    change, fragment = UPDATE_FAULTS[case]
    rewrite(updates["B"], **change)
    out = tmp_path / "round_001"
    assert_refused(capsys, _aggregate(plans_path, updates, out), updates["B"], fragment)
    assert not out.exists()


def test_two_sites_at_10_308_cases_are_refused_not_averaged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """(Once 'the weights sum to zero': 1e308 + 1e308 = inf.) The first file named is refused."""
    _plans, plans_path, updates = federation(tmp_path)
    for site in ("A", "B"):
        rewrite(updates[site], n_cases=10**308)
    out = tmp_path / "round_001"
    assert_refused(capsys, _aggregate(plans_path, updates, out), updates["A"], "'n_cases'")
    assert not out.exists()


def test_counts_at_the_bound_average_exactly(tmp_path: Path) -> None:
    """The bound admits the largest real site: three sites at 10^7 cases average with equal
    weights, in float64, without overflow."""
    plans = make_plans(sites={"A": 10_000_000, "B": 10_000_000, "C": 10_000_000})
    plans_path = tmp_path / "plans.json"
    plans.save(plans_path)
    updates = write_updates(plans, tmp_path)
    out = tmp_path / "round_001"
    assert _aggregate(plans_path, updates, out) == 0
    weights = json.loads((out / "aggregate.json").read_text())["weights"]["global"]
    assert weights == {"A": pytest.approx(1 / 3), "B": pytest.approx(1 / 3), "C": pytest.approx(1 / 3)}


MODEL_FAULTS = {
    "round 10^400": (dict(round=HUGE), "'round'"),
    "n_cases 10^400": (dict(n_cases=HUGE), "'n_cases' is invalid: expected an integer from 0 to 1,000,000,000,000"),
    "n_iterations 10^400": (dict(n_iterations=HUGE), "'n_iterations'"),
}


@pytest.mark.parametrize("case", sorted(MODEL_FAULTS))
def test_predict_and_inspect_bound_model_numbers(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    plans, plans_path, updates = federation(tmp_path)
    model = round_model(tmp_path, plans, updates)
    change, fragment = MODEL_FAULTS[case]
    rewrite(model, **change)
    (tmp_path / "images").mkdir()
    rc = run(["predict", "--plans", str(plans_path), "--weights", str(model), "-i", str(tmp_path / "images"),
              "-o", str(tmp_path / "pred"), "--site", "A", "-q"])
    assert_refused(capsys, rc, model, fragment)
    assert not (tmp_path / "pred").exists()
    before = listing(tmp_path)
    assert_refused(capsys, run(["inspect", str(model)]), model, fragment)
    assert listing(tmp_path) == before


def test_train_bounds_the_incoming_round(tmp_path: Path, tiny_sites: Path, capsys: pytest.CaptureFixture) -> None:
    plans, plans_path, updates = federation(tmp_path)
    model = round_model(tmp_path, plans, updates)
    rewrite(model, round=HUGE)
    data = next(p for p in sorted(tiny_sites.iterdir()) if p.is_dir())
    rc = run(["train", "--site", "A", "--data", str(data), "--plans", str(plans_path), "--weights", str(model),
              "--state", str(tmp_path / "state"), "-o", str(tmp_path / "upd" / "A.safetensors"), "-q"])
    assert_refused(capsys, rc, model, "'round'")
    assert not (tmp_path / "upd").exists() and not (tmp_path / "state").exists()


# -- fingerprints: what the coordinator's `plan` reads from every site ---------------------
@pytest.fixture(scope="module")
def fingerprint_text(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    site = next(p for p in sorted(tiny_sites.iterdir()) if p.is_dir())
    out = tmp_path_factory.mktemp("fp") / "fp.json"
    assert run(["fingerprint", "--site", "A", "--data", str(site), "-o", str(out), "-q"]) == 0
    return out.read_text()


def _sketch(fp: dict) -> dict:
    return fp["foreground_stats_per_channel"]["0"]["sketch"]


def _set_key(fp: dict, value: object) -> None:
    positive = _sketch(fp)["positive"]
    first = next(iter(positive))
    positive[str(value)] = positive.pop(first)


FINGERPRINT_FAULTS = {
    "n_cases 10^400": (lambda fp: fp.update(n_cases=HUGE), "n_cases must be an integer from 1 to 10,000,000"),
    "spacing inf": (lambda fp: fp["spacings"][0].__setitem__(0, float("inf")), "spacings must be finite"),
    "spacing 10^400": (lambda fp: fp["spacings"][0].__setitem__(0, HUGE), "spacings must be finite"),
    "shape 10^400": (lambda fp: fp["shapes_after_crop"][0].__setitem__(0, HUGE), "shapes_after_crop"),
    "relative size NaN": (lambda fp: fp["relative_sizes_after_crop"].__setitem__(0, float("nan")), "relative_sizes"),
    "label 10^400": (lambda fp: fp["labels"].__setitem__("lesion", HUGE), "label values"),
    "sketch sum inf": (lambda fp: _sketch(fp).__setitem__("sum", float("inf")), "sum must be finite"),
    "sketch count 10^400": (lambda fp: _sketch(fp).__setitem__("count", HUGE), "count must be a non-negative integer"),
    # a bucket key far outside the float range would size a dense bucket store of 80 TB
    "sketch bucket key 10^13": (lambda fp: _set_key(fp, 10**13), "bucket key"),
    "sketch alpha 1e-300": (lambda fp: _sketch(fp).__setitem__("alpha", 1e-300), "alpha must be in"),
    "integer of 5000 digits": (lambda fp: fp.update(n_cases=None), "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(FINGERPRINT_FAULTS))
def test_plan_bounds_fingerprint_numbers(tmp_path: Path, capsys: pytest.CaptureFixture, fingerprint_text: str, case: str) -> None:
    fp = json.loads(fingerprint_text)
    corrupt, fragment = FINGERPRINT_FAULTS[case]
    corrupt(fp)
    text = json.dumps(fp)
    if case == "integer of 5000 digits":   # beyond what Python's JSON reader converts
        text = text.replace('"n_cases": null', '"n_cases": 1' + "0" * 5000)
    path = tmp_path / "fp_A.json"
    path.write_text(text)
    out = tmp_path / "plans.json"
    assert_refused(capsys, run(["plan", str(path), "-o", str(out), "-q"]), path, fragment)
    assert not out.exists()

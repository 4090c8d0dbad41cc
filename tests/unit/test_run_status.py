"""fedseg status and fedseg report on a run folder written the way shell scripts write it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from test_federation_engine import make_plans, random_state

from fedseg.cli.main import run
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.site_update import write_site_update
from fedseg.federation.run_status import STATUS_SCHEMA, run_status
from fedseg.federation.weightfile import WeightMeta, write_weight_file

CURVE = {"iteration": [5, 10], "loss": [0.9, 0.7], "lr": [0.01, 0.005]}


def write_round(plans, run_dir: Path, r: int, sites: list[str], dice: dict[str, float]) -> list[Path]:
    paths = []
    for i, site in enumerate(sites):
        path = run_dir / f"round_{r:03d}" / "updates" / f"{site}.safetensors"
        write_site_update(
            plans, site, random_state(10 * r + i), path, round_index=r, n_iterations=10,
            extra={"val_dice": dice[site], "mean_loss": 0.8, "curve": CURVE},
        )
        paths.append(path)
    return paths


@pytest.fixture
def scripted_run(tmp_path: Path) -> Path:
    """4 planned rounds: 1 with every site, 2 without B (quorum 2), 3 under way with only A in."""
    plans = make_plans(params={"min_sites": 2})
    plans.training.rounds = 4
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plans.save(run_dir / "plans.json")
    round0 = run_dir / "round_000"
    for site in plans.sites:   # round 0 as `fedseg init` writes it, without building a network
        meta = WeightMeta(kind="model", plan_id=plans.plan_id, strategy="fedavg", site=site, round=0,
                          n_cases=plans.sites[site].n_cases, n_iterations=0, scopes={})
        write_weight_file(round0 / f"{site}.safetensors", {}, meta)
    aggregate_round(plans, write_round(plans, run_dir, 1, ["A", "B", "C"], {"A": 0.5, "B": 0.6, "C": 0.7}),
                    run_dir / "round_001")
    aggregate_round(plans, write_round(plans, run_dir, 2, ["A", "C"], {"A": 0.6, "C": 0.8}), run_dir / "round_002")
    write_round(plans, run_dir, 3, ["A"], {"A": 0.7})
    return run_dir


def test_status_reads_the_run_folder(scripted_run: Path) -> None:
    state = run_status(scripted_run)
    assert state.strategy == "fedavg" and state.min_sites == 2 and state.sites == ["A", "B", "C"]
    assert state.rounds_planned == 4 and state.rounds_completed == 2 and state.initialised
    r1, r2, r3 = state.rounds
    assert r1.sites_in == ["A", "B", "C"] and r1.sites_missing == [] and r1.mean_val_dice == pytest.approx(0.6)
    assert r2.sites_in == ["A", "C"] and r2.sites_missing == ["B"] and r2.mean_val_dice == pytest.approx(0.7)
    assert {s.site: s.val_dice for s in r2.sites} == {"A": 0.6, "C": 0.8}
    assert all(s.update_norm > 0 and s.upload_bytes > 0 and s.download_bytes > 0 for s in r1.sites)
    assert r1.sites[0].curve == CURVE
    assert not r3.complete and r3.sites_in == ["A"] and r3.sites_missing == ["B", "C"]
    assert state.next_action == "waiting for updates of B, C for round 3"
    assert r1.signed is False and state.signing_required is False


def test_status_json_follows_its_schema(scripted_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(["status", str(scripted_run), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    jsonschema.validate(document, STATUS_SCHEMA)
    assert document["rounds_completed"] == 2 and document["rounds"][1]["sites_missing"] == ["B"]
    # the schema is strict enough to catch a renamed or mistyped field
    for broken in ({**document, "rounds_completed": "2"}, {k: v for k, v in document.items() if k != "next_action"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, STATUS_SCHEMA)


def test_status_next_action_follows_the_run(scripted_run: Path, capsys: pytest.CaptureFixture) -> None:
    plans_path = scripted_run / "plans.json"
    from fedseg.planning.plans import load_plans

    plans = load_plans(plans_path)
    write_round(plans, scripted_run, 3, ["C"], {"C": 0.9})
    assert "quorum of 2 is reached: round 3 can be aggregated now" in run_status(scripted_run).next_action
    write_round(plans, scripted_run, 3, ["B"], {"B": 0.9})
    assert run_status(scripted_run).next_action.startswith("aggregate round 3: every update is in")
    assert run(["status", str(scripted_run)]) == 0
    text = capsys.readouterr().out
    assert "rounds: 2 of 4 complete" in text and re.search(r"round 2 \(\d+ s\): mean val Dice 0.700", text) and "missing B" in text


def test_status_refuses_a_folder_that_is_no_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x").mkdir()
    assert run(["status", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedseg: error: ") and "no plans.json" in err and len(err.splitlines()) == 1
    assert run(["status", str(tmp_path / "missing")]) == 2


def test_report_is_one_self_contained_page(scripted_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "html"
    assert run(["report", str(scripted_run), "-o", str(out), "-q"]) == 0
    page = (out / "report.html").read_text()
    assert (out / "report.html").stat().st_mode & 0o044 == 0o044   # readable by others: a page to share
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert images == ["Validation Dice per site", "Training loss", "Learning rate", "Update norms", "Bytes exchanged"]
    assert not re.search(r'(src|href)="(?!data:)', page)   # nothing loaded from elsewhere
    assert "waiting for updates of B, C for round 3" in page
    assert "<td>2</td><td>complete</td><td>A, C</td><td>B</td>" in page


def _browser() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


def test_report_renders_in_a_headless_browser(scripted_run: Path, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (Debian: apt-get install chromium)")
    out = tmp_path / "html"
    assert run(["report", str(scripted_run), "-o", str(out), "-q"]) == 0
    # a copy of the page that records, once loaded, the decoded width of every image
    probe = out / "probe.html"
    probe.write_text((out / "report.html").read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => document.body.setAttribute('data-widths', "
        "[...document.images].map(i => i.naturalWidth).join(',')));</script></body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "fedseg run report" in dom and "waiting for updates of B, C for round 3" in dom
    widths = [int(w) for w in re.search(r'data-widths="([^"]*)"', dom).group(1).split(",")]
    assert len(widths) == 5 and all(w == 550 for w in widths), widths   # 5.5 in x 100 dpi, all decoded


def test_inspect_a_run_folder_and_its_files(scripted_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(["inspect", str(scripted_run)]) == 0
    assert "next: waiting for updates of B, C for round 3" in capsys.readouterr().out
    assert run(["inspect", str(scripted_run), "--json"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), STATUS_SCHEMA)
    # plan values in brackets are data, not console markup; a manifest counts tensors
    assert run(["inspect", str(scripted_run / "plans.json")]) == 0
    out = capsys.readouterr().out
    assert '"use_mask_for_norm":' in out and "[false]" in out and '": ,' not in out
    assert "tensors per configuration" in out
    summary = scripted_run / "report" / "metrics.json"
    summary.parent.mkdir()
    summary.write_text(json.dumps({"plan_id": "x", "val_dice_per_round": {"A": [0.5]}, "test": {}}))
    assert run(["inspect", str(summary)]) == 0
    assert "run summary" in capsys.readouterr().out
    assert run(["inspect", str(scripted_run / "round_001" / "updates")]) == 2
    assert "without plans.json" in capsys.readouterr().err

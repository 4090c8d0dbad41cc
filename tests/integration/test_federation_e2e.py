"""Tiny end-to-end federations: the library path (simulate) and the shell path (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.federation.single_machine import SimulationConfig, simulate
from fedseg.federation.site_training import load_site_model
from fedseg.planning.plans import load_plans
from fedseg.training.evaluation import evaluate_folders
from fedseg.training.inference import predict_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fedavg_run(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("fedavg_run")
    config = SimulationConfig(sites_root=tiny_sites, strategy="fedavg", rounds=2, run_dir=run_dir, iterations=15, workers=1)
    return run_dir, simulate(config)


def test_simulate_writes_the_run_folder(fedavg_run) -> None:
    run_dir, result = fedavg_run
    sites = sorted(result.val_dice)
    assert (run_dir / "plans.json").is_file()
    for r in (1, 2):
        rdir = run_dir / f"round_{r:03d}"
        record = json.loads((rdir / "aggregate.json").read_text())
        assert record["round"] == r
        assert sorted(i["site"] for i in record["inputs"]) == sites
        assert (rdir / "models" / "global.safetensors").is_file()
        for site in sites:
            assert (rdir / "updates" / f"{site}.safetensors").is_file()
            assert (rdir / f"{site}.safetensors").is_file()
    assert (run_dir / "report" / "val_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert sorted(report["test"]) == sites


def test_federation_learns(fedavg_run, tiny_sites: Path, tmp_path: Path) -> None:
    run_dir, result = fedavg_run
    plans = load_plans(run_dir / "plans.json")
    # Before any training (round 0) the model segments nothing useful...
    site = sorted(plans.sites)[0]
    network = load_site_model(plans, site, run_dir / "round_000" / f"{site}.safetensors", None)
    predict_folder(network, tiny_sites / site / "imagesTs", tmp_path / "r0", plans, plans.configuration_for(site))
    before = evaluate_folders(tmp_path / "r0", tiny_sites / site / "labelsTs", plans.labels, plans.file_ending)
    assert before["foreground_mean"]["dice"] < 0.5
    # ...validation Dice rises from round 1 to round 2, and every site's test Dice ends >= 0.7.
    rounds = list(zip(*result.val_dice.values()))
    assert sum(rounds[1]) / len(rounds[1]) > sum(rounds[0]) / len(rounds[0])
    final = [m["foreground_mean"]["dice"] for m in result.test_metrics.values()]
    assert min(final) >= 0.7, final
    assert sum(final) / len(final) >= 0.8, final


def test_simulate_started_again_skips_complete_rounds(fedavg_run, tiny_sites: Path) -> None:
    run_dir, result = fedavg_run
    stamp = (run_dir / "round_002" / "aggregate.json").stat().st_mtime_ns
    config = SimulationConfig(sites_root=tiny_sites, strategy="fedavg", rounds=2, run_dir=run_dir, iterations=15, workers=1)
    again = simulate(config)
    assert (run_dir / "round_002" / "aggregate.json").stat().st_mtime_ns == stamp
    assert again.val_dice == result.val_dice


def test_shell_pipeline_as_a_site_script_runs_it(tiny_sites: Path, tmp_path: Path) -> None:
    """fingerprint -> plan -> init -> train x sites -> aggregate, 2 rounds, then predict/evaluate."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "work"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "federation_example.sh"), str(tiny_sites), str(work), "2", "15"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sites = sorted(p.name for p in tiny_sites.iterdir())
    record = json.loads((work / "round_002" / "aggregate.json").read_text())
    assert record["round"] == 2 and sorted(i["site"] for i in record["inputs"]) == sites
    for site in sites:
        metrics = json.loads((work / f"metrics_{site}.json").read_text())
        assert metrics["n_cases"] == len(list((tiny_sites / site / "labelsTs").iterdir()))
        # the same training as `simulate` above (2 rounds x 15 iterations), so the same bar: a
        # pipeline that lost the aggregate or predicted with other weights scores near 0
        assert metrics["foreground_mean"]["dice"] >= 0.7, (site, metrics["foreground_mean"])
    # the script ends with `fedseg status` and `fedseg report` on its folder
    assert "next: done: all 2 round(s) complete, with test metrics" in result.stdout
    page = (work / "report" / "report.html").read_text()
    assert "Test metrics" in page and page.count('src="data:image/png;base64,') == 5


def test_update_from_another_round_is_refused(fedavg_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedseg.cli.main import run

    run_dir, _ = fedavg_run
    sites = sorted(p.stem for p in (run_dir / "round_001" / "updates").iterdir())
    mixed = [run_dir / "round_001" / "updates" / f"{sites[0]}.safetensors"] + [
        run_dir / "round_002" / "updates" / f"{s}.safetensors" for s in sites[1:]
    ]
    out = tmp_path / "round_x"
    rc = run(["aggregate", "--plans", str(run_dir / "plans.json"), *map(str, mixed), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "round" in err
    assert not out.exists() or not any(out.iterdir())


def test_status_and_report_of_a_simulated_run(fedavg_run, tmp_path: Path) -> None:
    from fedseg.federation.run_report import write_run_report
    from fedseg.federation.run_status import run_status

    run_dir, result = fedavg_run
    state = run_status(run_dir)
    assert state.rounds_completed == 2 and state.next_action.startswith("done: all 2 round(s) complete")
    assert sorted(state.test_metrics) == sorted(result.val_dice)
    for r in state.rounds:
        for site in r.sites:
            # each update carries the site's training curve: 15 iterations, the poly schedule falling
            assert site.curve["iteration"][-1] == 15 and len(site.curve["loss"]) == 15
            assert site.curve["lr"][0] > site.curve["lr"][-1] > 0
            assert site.val_dice == pytest.approx(result.val_dice[site.site][r.round - 1])
    page = write_run_report(run_dir, tmp_path).read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "Test metrics" in page


def test_init_and_predict_print_json(fedavg_run, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedseg.cli.main import run

    run_dir, _ = fedavg_run
    assert run(["init", "--plans", str(run_dir / "plans.json"), "-o", str(tmp_path / "round_000"), "-q", "--json"]) == 0
    init = json.loads(capsys.readouterr().out)
    assert init["plan_id"] == json.loads((run_dir / "plans.json").read_text())["plan_id"]
    assert sorted(Path(p).name for p in init["written"]) == [
        "global.safetensors", "site_a.safetensors", "site_b.safetensors", "site_c.safetensors"]
    assert run(["predict", "--plans", str(run_dir / "plans.json"), "--weights", str(run_dir / "round_002" / "site_a.safetensors"),
                "-i", str(tiny_sites / "site_a" / "imagesTs"), "-o", str(tmp_path / "pred"), "--site", "site_a",
                "--state", str(run_dir / "state" / "site_a"), "-q", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["site"] == "site_a" and len(predicted["written"]) == len(list((tiny_sites / "site_a" / "labelsTs").iterdir()))
    assert all(Path(p).is_file() for p in predicted["written"])


def test_resume_redoes_a_round_whose_record_is_gone(fedavg_run, tiny_sites: Path) -> None:
    """Last in this module: it rewrites round 2 of the shared run (with the same content)."""
    from fedseg.federation.run_folder import first_round_to_redo

    run_dir, result = fedavg_run
    (run_dir / "round_002" / "aggregate.json").unlink()
    stale = run_dir / "round_002" / "stale.txt"
    stale.write_text("not part of the round")
    said: list[str] = []
    config = SimulationConfig(sites_root=tiny_sites, strategy="fedavg", rounds=2, run_dir=run_dir, iterations=15, workers=1)
    again = simulate(config, log=said.append)
    assert "round 1: already complete, skipped" in said
    assert not stale.exists() and (run_dir / "round_002" / "aggregate.json").is_file()
    # each site's state went back to where round 2 started: the finished round 2 comes out again
    assert again.val_dice == result.val_dice
    assert first_round_to_redo(run_dir, 2) == 3

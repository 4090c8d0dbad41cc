"""`fedseg plan` and `simulate` assemble the plan with the same function: the same fingerprints and
options give the same plan_id either way."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.cli.main import run
from fedseg.federation.run_setup import plan_run
from fedseg.planning.plans import load_plans


@pytest.fixture(scope="module")
def fingerprint_files(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedseg.data.dataset import load_dataset
    from fedseg.planning.fingerprint import compute_fingerprint, save_fingerprint

    folder = tmp_path_factory.mktemp("fingerprints")
    paths = []
    for site in ("site_a", "site_b", "site_c"):
        paths.append(folder / f"{site}.json")
        save_fingerprint(compute_fingerprint(load_dataset(tiny_sites / site), site), paths[-1])
    return paths


@pytest.mark.parametrize("strategy, sets", [
    ("fedavg", {"configuration.patch_size": "16,16,16", "weighting": "uniform"}),
    ("local", {"configuration.per_site": "true"}),
])
def test_cli_plan_and_simulate_plan_agree(fingerprint_files: list[Path], tmp_path: Path, strategy: str, sets: dict) -> None:
    from fedseg.planning.fingerprint import load_fingerprint

    sets = {**sets, "training.rounds": "2", "training.iterations_per_round": "5"}
    argv = ["plan", *map(str, fingerprint_files), "--strategy", strategy, "--seed", "7", "-o", str(tmp_path / "plans.json"), "-q"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    assert run(argv) == 0
    by_cli = load_plans(tmp_path / "plans.json")
    by_simulate = plan_run([load_fingerprint(p) for p in fingerprint_files], strategy=strategy, rounds=2,
                           configuration="3d_fullres", iterations=5, overrides=sets, seed=7)
    assert by_cli.plan_id == by_simulate.plan_id
    assert by_cli.strategy.params == by_simulate.strategy.params
    assert by_cli.extra == by_simulate.extra   # the strategy's manifests, attached by both

"""fedmsa and fedsam end to end: a tiny 2-round simulation each on the 2D `fedfms` preset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedseg.federation.single_machine import SimulationConfig, simulate

ROUNDS, ITERATIONS = 3, 40


@pytest.fixture(scope="module")
def fedfms_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedseg.synth import generate

    root = tmp_path_factory.mktemp("fedfms_sites")
    generate(root, preset="fedfms", seed=0)
    shutil.rmtree(root / "site_c")   # two sites keep the test short
    return root


@pytest.fixture(scope="module")
def runs(fedfms_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for strategy in ("fedmsa", "fedsam"):
        run_dir = tmp_path_factory.mktemp(strategy)
        config = SimulationConfig(
            sites_root=fedfms_sites, strategy=strategy, rounds=ROUNDS, run_dir=run_dir, configuration="2d",
            iterations=ITERATIONS, workers=0, overrides={"sam.config": "tiny"},
        )
        out[strategy] = (run_dir, simulate(config))
    return out


def _update_bytes(run_dir: Path) -> int:
    return (run_dir / "round_001" / "updates" / "site_a.safetensors").stat().st_size


def test_fedmsa_updates_are_at_most_a_third_of_fedsams(runs) -> None:
    msa_dir, msa = runs["fedmsa"]
    sam_dir, sam = runs["fedsam"]
    assert _update_bytes(msa_dir) * 3 <= _update_bytes(sam_dir)
    # the traffic is recorded per site and round, in aggregate.json and in the report
    record = json.loads((msa_dir / "round_002" / "aggregate.json").read_text())
    assert record["traffic"]["per_site"]["site_a"]["upload"] == (msa_dir / "round_002" / "updates" / "site_a.safetensors").stat().st_size
    assert record["traffic"]["per_site"]["site_b"]["download"] == (msa_dir / "round_002" / "site_b.safetensors").stat().st_size
    report = json.loads((msa_dir / "report" / "metrics.json").read_text())
    assert report["bytes_per_round"]["site_a"][0]["upload"] == _update_bytes(msa_dir)
    assert msa.traffic["site_a"][0]["upload"] * 3 <= sam.traffic["site_a"][0]["upload"]


def test_fedmsa_keeps_the_frozen_backbone_out_of_the_state_folder(runs) -> None:
    msa_dir, _ = runs["fedmsa"]
    sam_dir, _ = runs["fedsam"]
    for name in ("checkpoint.safetensors", "optimizer.safetensors"):
        assert (msa_dir / "state" / "site_a" / name).stat().st_size * 3 <= (sam_dir / "state" / "site_a" / name).stat().st_size
    assert (msa_dir / "state" / "site_a" / "local.safetensors").stat().st_size < 1024   # nothing local
    assert (msa_dir / "round_000" / "site_a.safetensors").stat().st_size * 3 <= (sam_dir / "round_000" / "site_a.safetensors").stat().st_size


@pytest.mark.parametrize("strategy", ["fedmsa", "fedsam"])
def test_both_learn(runs, strategy: str) -> None:
    _, result = runs[strategy]
    per_round = [sum(values) / len(values) for values in zip(*result.val_dice.values())]
    assert per_round[-1] > per_round[0], per_round
    # 3 rounds x 40 iterations from a random tiny SAM reach validation Dice 0.67 (fedmsa) and
    # 0.75 (fedsam), test Dice 0.69-0.74 per site (at 25 iterations fedmsa's frozen random
    # backbone left it at 0.29 on some folds); a model that only predicts background scores 0
    assert per_round[-1] >= 0.4, per_round
    test = {site: m["foreground_mean"]["dice"] for site, m in result.test_metrics.items()}
    assert all(dice >= 0.5 for dice in test.values()), test

"""A tiny mix-modal federation end to end: plan, 2 rounds of mixmfl, aggregation with the
memory, prediction with each site's own sequences."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def test_mixmfl_two_rounds_with_memory(tmp_path: Path):
    from fedseg.synth import generate
    from fedseg.federation.single_machine import SimulationConfig, simulate
    from fedseg.federation.weightfile import read_weight_file
    from fedseg.planning.plans import load_plans
    from fedseg.training.prototype_memory import SHARED_KEY, filled_rows, tailored_key

    generate(tmp_path / "all", preset="mixmfl", seed=0)
    sites = tmp_path / "sites"
    sites.mkdir()
    # three sites cover the four sequences: T1+T1ce, T1+T2, T2+FLAIR
    for name in ("site1", "site2", "site6"):
        shutil.copytree(tmp_path / "all" / name, sites / name)
    run = tmp_path / "run"
    result = simulate(SimulationConfig(
        sites, "mixmfl", 2, run, iterations=2, workers=0,
        overrides={"configuration.patch_size": "16,16,16", "memory_size": "40", "prototypes": "4"},
    ))

    plans = load_plans(run / "plans.json")
    assert plans.sites["site1"].channels == ["T1", "T1ce"]
    tensors, meta = read_weight_file(run / "round_002" / "site1.safetensors")
    # site1 receives the merged memories of every stage: T2 prototypes come from site2
    # (T1+T2) and site6 (T2+FLAIR), per round 4 keyed by the shared representation and 4 by
    # the tailored one of the site's other sequence (T1 at site2, FLAIR at site6)
    stages = plans.configuration_for("site1").network.n_stages
    for stage in range(stages):
        name = f"memory.T2.{stage}"
        rows = filled_rows(tensors[name])
        assert [tuple(r[:2]) for r in rows] == [(1, 2)] * 8 + [(1, 3)] * 8 + [(2, 2)] * 8 + [(2, 3)] * 8
        sources = {(int(r[1]), int(r[3])) for r in rows}
        assert sources == {(2, SHARED_KEY), (2, tailored_key(0)), (3, SHARED_KEY), (3, tailored_key(3))}
        assert meta.scopes[name] == "memory:T2"
    # its T1 encoder comes from the T1 holders' pool; the T2 encoder it never trains is not sent to it
    assert any(name.startswith("tailored.T1.") for name in tensors)
    assert not any(name.startswith("tailored.T2.") for name in tensors)
    update, _ = read_weight_file(run / "round_002" / "updates" / "site1.safetensors")
    assert not any(name.startswith("tailored.T2.") for name in update)
    assert (run / "round_002" / "models" / "FLAIR.safetensors").is_file()

    # every site predicted each of its test cases from its own two sequences: a label map on
    # the case's own grid with the plan's labels only, scored against the reference (2 x 2
    # iterations teach nothing yet, so the score is only checked to be a real Dice)
    from fedseg.data.image_io import read_image

    for site in ("site1", "site2", "site6"):
        preds = sorted((run / "report" / "predictions" / site).iterdir())
        refs = sorted((sites / site / "labelsTs").iterdir())
        assert [p.name for p in preds] == [r.name for r in refs]
        for pred, ref in zip(preds, refs):
            (predicted, _), (reference, _) = read_image(pred), read_image(ref)
            assert predicted.shape == reference.shape
            assert set(np.unique(predicted).tolist()) <= set(range(plans.n_classes))
        dice = result.test_metrics[site]["foreground_mean"]["dice"]
        assert isinstance(dice, float) and 0.0 <= dice <= 1.0, dice

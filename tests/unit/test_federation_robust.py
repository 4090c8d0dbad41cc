"""Robust combiners: coordinate median, trimmed mean, norm clipping — options of the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_federation_engine import FLOAT_NAMES, N_CASES, make_plans, random_state, write_updates

from fedseg.errors import InputError
from fedseg.federation import robust as robust_mod
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.site_update import write_site_update
from fedseg.federation.robust import RobustSpec, parse_robust, robust_combine, trim_count
from fedseg.federation.weightfile import WeightMeta, read_weight_file, write_weight_file


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, RobustSpec()),
        ({"robust": "median"}, RobustSpec("median")),
        ({"robust": "trimmed:0.2"}, RobustSpec("trimmed", 0.2)),
        ({"robust": "trimmed"}, RobustSpec("trimmed", 0.1)),
        ({"clip_norm": 3}, RobustSpec(clip_norm=3.0)),
    ],
)
def test_parse(params, expected) -> None:
    assert parse_robust(params) == expected


@pytest.mark.parametrize(
    "params", [{"robust": "mediam"}, {"robust": "trimmed:0.5"}, {"robust": "trimmed:x"}, {"robust": 3},
               {"clip_norm": 0}, {"clip_norm": "big"}, {"clip_norm": True}],
)
def test_bad_values_are_refused_by_the_strategy_check(params, tmp_path: Path) -> None:
    plans = make_plans(params=params)
    with pytest.raises(InputError, match="robust|clip_norm"):
        aggregate_round(plans, [tmp_path / "none.safetensors"], tmp_path / "out")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_combiners_match_numpy(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(robust_mod, "_BLOCK", 7)   # force several blocks and a ragged last one
    rng = np.random.default_rng(n)
    arrays = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(n)]
    stack = np.stack(arrays).astype(np.float64)
    np.testing.assert_allclose(robust_combine(RobustSpec("median"), arrays), np.median(stack, axis=0), rtol=0, atol=0)
    cut = trim_count(n, 0.2)
    expected = np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
    np.testing.assert_allclose(robust_combine(RobustSpec("trimmed", 0.2), arrays), expected, rtol=1e-15)
    assert trim_count(5, 0.2) == 1 and trim_count(4, 0.2) == 0 and trim_count(2, 0.49) == 0


FIVE = {"A": 3, "B": 5, "C": 8, "D": 4, "E": 6}


def poisoned_round(tmp_path: Path, params: dict, scale: float = -10.0):
    """Five sites with similar weights; E sends its update x scale."""
    plans = make_plans(params=params, sites=FIVE)
    base = random_state(0)
    rng = np.random.default_rng(7)
    paths = []
    honest = {}
    for site in sorted(FIVE):
        state = {k: (v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype) if v.dtype == np.float32 else v) for k, v in base.items()}
        honest[site] = state
        if site == "E":
            state = {k: (v * np.float32(scale) if v.dtype == np.float32 else v) for k, v in state.items()}
        path = tmp_path / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, state, path, round_index=1, n_iterations=5)
        paths.append(path)
    return plans, paths, honest, base


@pytest.mark.parametrize("rule", ["median", "trimmed:0.2"])
def test_robust_rules_survive_a_scaled_update(tmp_path: Path, rule: str) -> None:
    plans, paths, honest, base = poisoned_round(tmp_path / "mean", {})
    aggregate_round(plans, paths, tmp_path / "mean" / "round_001")
    poisoned, _ = read_weight_file(tmp_path / "mean" / "round_001" / "models" / "global.safetensors")
    plans, paths, honest, base = poisoned_round(tmp_path / "robust", {"robust": rule})
    report = aggregate_round(plans, paths, tmp_path / "robust" / "round_001")
    robust, _ = read_weight_file(tmp_path / "robust" / "round_001" / "models" / "global.safetensors")
    for name in FLOAT_NAMES:
        honest_values = np.stack([honest[s][name] for s in sorted(FIVE)]).astype(np.float64)
        assert np.abs(poisoned[name] - base[name]).max() > 1.0                     # the mean is wrecked
        assert np.abs(robust[name] - base[name]).max() < 0.05                     # the robust rule is not
        # exactly the coordinate rule over what was sent
        sent = np.stack([read_weight_file(p)[0][name] for p in paths]).astype(np.float64)
        if rule == "median":
            np.testing.assert_allclose(robust[name], np.median(sent, axis=0).astype(np.float32))
        else:
            np.testing.assert_allclose(robust[name], np.sort(sent, axis=0)[1:4].mean(axis=0).astype(np.float32), rtol=1e-6)
        assert honest_values.shape[0] == 5
    assert report.weights == {"global": None}
    assert report.robust["rule"] == rule.split(":")[0]
    saved = json.loads((tmp_path / "robust" / "round_001" / "aggregate.json").read_text())
    assert saved["robust"]["rule"] == rule.split(":")[0]


def write_previous(plans, folder: Path, states: dict[str, dict[str, np.ndarray]], round_index: int = 0) -> None:
    for site, state in states.items():
        tensors = {k: v for k, v in state.items() if v.dtype == np.float32}
        meta = WeightMeta(kind="model", plan_id=plans.plan_id, strategy="fedavg", site=site, round=round_index,
                          n_cases=1, n_iterations=0, scopes={k: "global" for k in tensors})
        write_weight_file(folder / f"{site}.safetensors", tensors, meta)


def test_clip_norm_scales_long_deltas_toward_the_previous_model(tmp_path: Path) -> None:
    plans, paths, honest, base = poisoned_round(tmp_path, {"clip_norm": 1.0})
    out = tmp_path / "round_001"
    with pytest.raises(InputError, match="--previous"):
        aggregate_round(plans, paths, out)
    assert not out.exists()
    write_previous(plans, tmp_path / "round_000", {s: base for s in FIVE})
    report = aggregate_round(plans, paths, out)
    inputs = {r.site: r for r in report.inputs}
    for site in FIVE:
        sent, _ = read_weight_file(tmp_path / "updates" / f"{site}.safetensors")
        delta = np.sqrt(sum(float(np.sum((sent[n].astype(np.float64) - base[n]) ** 2)) for n in FLOAT_NAMES))
        assert inputs[site].delta_norm == pytest.approx(delta, rel=1e-9)
        assert inputs[site].clip_factor == pytest.approx(min(1.0, 1.0 / delta))
    assert inputs["E"].clip_factor < 0.2 and all(inputs[s].clip_factor == 1.0 for s in "ABCD")
    result, _ = read_weight_file(out / "models" / "global.safetensors")
    total = sum(FIVE.values())
    for name in FLOAT_NAMES:
        expected = np.zeros(base[name].shape)
        for site, n in FIVE.items():
            sent, _ = read_weight_file(tmp_path / "updates" / f"{site}.safetensors")
            f = inputs[site].clip_factor
            expected += n / total * (base[name] + f * (sent[name].astype(np.float64) - base[name]))
        np.testing.assert_allclose(result[name], expected.astype(np.float32), rtol=1e-5, atol=1e-6)
    # the previous round can also be named explicitly, and must be the round r-1 model of this plan
    wrong = tmp_path / "elsewhere"
    write_previous(plans, wrong, {s: base for s in FIVE}, round_index=4)
    with pytest.raises(InputError, match="not the round-0 model"):
        aggregate_round(plans, paths, tmp_path / "other", previous_dir=wrong)


def test_robust_needs_a_weighted_mean_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseg.federation.strategies.fedavg import FedAvg

    plans, paths, _honest, _base = poisoned_round(tmp_path, {"robust": "median"})
    monkeypatch.setattr(FedAvg, "pool_weights", lambda self, plans, pool, contributions: None)
    with pytest.raises(InputError, match="by its own rule"):
        aggregate_round(plans, paths, tmp_path / "round_001")
    assert not (tmp_path / "round_001").exists()


def test_three_sites_without_robust_are_unchanged(tmp_path: Path) -> None:
    """The default (no robust keys) is plain FedAvg, bit for bit."""
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    report = aggregate_round(plans, list(paths.values()), tmp_path / "r")
    assert report.robust is None and report.weights["global"] == {s: n / sum(N_CASES.values()) for s, n in N_CASES.items()}

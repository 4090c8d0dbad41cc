"""mixmfl planning and aggregation: mix-modal plans, scopes per sequence, memory merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseg.errors import InputError
from fedseg.federation.routes import route_table
from fedseg.federation.strategies import get_strategy
from fedseg.federation.strategies.base import Contribution


@pytest.fixture(scope="module")
def mixmfl_fingerprints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    from fedseg.data.dataset import load_dataset
    from fedseg.synth import generate
    from fedseg.planning.fingerprint import compute_fingerprint

    root = tmp_path_factory.mktemp("mixmfl_sites")
    generate(root, preset="mixmfl", seed=0)
    fps = [compute_fingerprint(load_dataset(root / s), s) for s in ("site1", "site2", "site6")]
    return root, fps


def _plans(fps, strategy="mixmfl", **overrides):
    from fedseg.federation.plan_building import build_plans

    return build_plans(fps, strategy=strategy, configuration="3d_fullres",
                       overrides={k: str(v) for k, v in overrides.items()}, seed=1234)


def test_plan_records_global_sequences_and_site_subsets(mixmfl_fingerprints):
    _root, fps = mixmfl_fingerprints
    plans = _plans(fps)
    assert list(plans.channel_names.values()) == ["T1", "T1ce", "T2", "FLAIR"]
    assert plans.sites["site1"].channels == ["T1", "T1ce"]
    assert plans.sites["site6"].channels == ["T2", "FLAIR"]
    assert plans.configuration_for(None).normalization_schemes == ["ZScoreNormalization"] * 4


def test_fedavg_needs_missing_zero_for_sites_with_different_sequences(mixmfl_fingerprints):
    _root, fps = mixmfl_fingerprints
    from fedseg.planning.planner import make_plans

    # plain fedavg pairs channels by index (site1's T1 with site6's T2): two mixed channels
    assert make_plans(fps, strategy="fedavg").n_channels == 2
    plans = _plans(fps, strategy="fedavg", missing="zero")
    assert list(plans.channel_names.values()) == ["T1", "T1ce", "T2", "FLAIR"]
    with pytest.raises(InputError, match="channel"):
        make_plans(fps[:1] + [{**fps[1], "channel_names": {"0": "T1"}}], strategy="fedavg")
    with pytest.raises(InputError, match="missing"):
        get_strategy("fedavg").check_params({"missing": "mean"})


def test_scopes_per_sequence_and_ablation_switches(mixmfl_fingerprints):
    _root, fps = mixmfl_fingerprints
    plans = _plans(fps)
    s = get_strategy("mixmfl")
    table = route_table(plans)
    names = plans.extra["manifests"]["3d_fullres"]
    t1 = next(n for n in names if n.startswith("tailored.T1."))
    t2 = next(n for n in names if n.startswith("tailored.T2."))
    assert table.pool_of("site1", t1) == "group:T1"
    assert table.pool_of("site2", t1) == "group:T1"
    assert table.pool_of("site6", t1) is None          # site6 has no T1: its copy stays local
    assert table.pool_of("site1", t2) is None
    assert table.pool_of("site6", t2) == "group:T2"
    for prefix in ("shared.", "decoder.", "fuse.", "decoupler."):
        name = next(n for n in names if n.startswith(prefix))
        assert {table.pool_of(site, name) for site in plans.sites} == {"global"}
    assert table.pool_of("site6", "memory.T1.0") == "memory:T1"   # everyone receives every memory
    assert table.pool_of("site1", "memory.T1.2") == "memory:T1"   # of every stage
    assert sorted(table.model_pools()) == sorted(["global", "group:T1", "group:T1ce", "group:T2", "group:FLAIR"])

    no_tailored = _plans(fps, tailored="false")
    assert route_table(no_tailored).pool_of("site6", t1) == "global"
    no_memory = _plans(fps, memory="false")
    assert route_table(no_memory).pool_of("site1", "memory.T1.0") is None
    with pytest.raises(InputError):
        s.check_params({"memory": "maybe"})
    with pytest.raises(InputError, match="memory_query"):
        s.check_params({"memory_query": "nearest"})
    s.check_params({"memory_query": "tailored"})


def test_tailored_pool_is_the_plain_mean_over_holders_and_weighted_on_request(mixmfl_fingerprints):
    _root, fps = mixmfl_fingerprints
    s = get_strategy("mixmfl")
    holders = [Contribution("site1", 10, 5, np.full(3, 1.0, np.float32)), Contribution("site2", 30, 5, np.full(3, 5.0, np.float32))]
    assert np.allclose(s.combine(_plans(fps), "group:T1", "tailored.T1.x", holders), 3.0)   # Σ m_i w_i / Σ m_i
    weighted = _plans(fps, tailored_weighting="n_cases")
    assert np.allclose(s.combine(weighted, "group:T1", "tailored.T1.x", holders), 4.0)      # (10·1 + 30·5) / 40
    # the shared parts stay weighted by case count
    assert np.allclose(s.combine(_plans(fps), "global", "decoder.x", holders), 4.0)
    with pytest.raises(InputError, match="tailored_weighting must be one of uniform, n_cases"):
        s.check_params({"tailored_weighting": "median"})
    # under secure aggregation each site weighs its own masked contribution by the same rule
    assert [s.sum_weight(_plans(fps), "group:T1", n) for n in (10, 30)] == [1.0, 1.0]
    assert [s.sum_weight(weighted, "group:T1", n) for n in (10, 30)] == [10.0, 30.0]
    assert s.sum_weight(_plans(fps), "global", 30) == 30.0


def test_memory_pool_merges_by_fifo(mixmfl_fingerprints):
    from fedseg.training.prototype_memory import empty_memory, filled_rows, prototype_rows, push

    _root, fps = mixmfl_fingerprints
    plans = _plans(fps, memory_size=4)
    s = get_strategy("mixmfl")
    base = empty_memory(4, 2)
    a = push(base, prototype_rows(np.ones((3, 2)), np.ones((3, 2)), 1, 1))
    b = push(base, prototype_rows(np.zeros((2, 2)) + 2, np.zeros((2, 2)) + 2, 1, 2))
    merged = s.combine(plans, "memory:T1", "memory.T1.0", [Contribution("site1", 10, 5, a), Contribution("site2", 10, 5, b),
                                                           Contribution("site6", 10, 5, base)])
    assert merged.shape == (4, 8)
    assert [tuple(r[:3]) for r in filled_rows(merged)] == [(1, 1, 1), (1, 1, 2), (1, 2, 0), (1, 2, 1)]
    assert s.pool_weights(plans, "memory:T1", []) is None

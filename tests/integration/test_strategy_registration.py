"""A strategy defined outside the package (here, in this test) is registered and runs a whole round:
plan, round 0, site training, aggregation, prediction (docs/architecture.md, "How to add a strategy")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedseg.federation.strategies import (
    Contribution, Strategy, get_strategy, register_strategy, strategy_names, unregister_strategy,
)
from fedseg.federation.strategies.base import Manifest, ProposedRoutes, every_tensor_to, weighted_mean
from fedseg.planning.plans import Plans


class UniformMean(Strategy):
    """A toy averaging rule: one global model, every site weighing the same whatever its size."""

    name = "toy_uniform_mean"
    description = "one global model; unweighted mean of the sites' tensors"

    def route(self, plans: Plans, manifests: Mapping[str, Manifest]) -> ProposedRoutes:
        # every tensor of every site to one pool, written as models/global.safetensors
        return ProposedRoutes(every_tensor_to(manifests, lambda site: "global"), model_pools=frozenset({"global"}))

    def combine(self, plans: Plans, pool: str, key: str, contributions: Sequence[Contribution]) -> np.ndarray:
        return weighted_mean(contributions, [1.0 / len(contributions)] * len(contributions))


@pytest.fixture
def registered():
    register_strategy(UniformMean)
    yield UniformMean.name
    unregister_strategy(UniformMean.name)


def test_registered_strategy_runs_a_round(registered: str, tiny_sites: Path, tmp_path: Path) -> None:
    from fedseg.federation.single_machine import SimulationConfig, simulate
    from fedseg.federation.weightfile import read_weight_file

    assert registered in strategy_names() and isinstance(get_strategy(registered), UniformMean)
    run = tmp_path / "run"
    result = simulate(SimulationConfig(tiny_sites, registered, 1, run, iterations=1, workers=0,
                                       overrides={"configuration.patch_size": "16,16,16"}))
    assert result.plan_id and set(result.test_metrics) == {"site_a", "site_b", "site_c"}
    # the global model is the unweighted mean of the three updates (the sites hold 8 cases each
    # in `tiny`, so case weighting would agree: compare with a deliberately unweighted mean)
    updates = [read_weight_file(run / "round_001" / "updates" / f"{s}.safetensors")[0] for s in ("site_a", "site_b", "site_c")]
    model, _meta = read_weight_file(run / "round_001" / "models" / "global.safetensors")
    float_names = [n for n in model if np.issubdtype(model[n].dtype, np.floating)]
    assert float_names
    for name in float_names:
        expected = np.mean([u[name].astype(np.float64) for u in updates], axis=0)
        np.testing.assert_allclose(model[name], expected, rtol=1e-5, atol=1e-6)


def test_register_refuses_a_taken_or_bad_name() -> None:
    class Impostor(UniformMean):
        name = "fedavg"

    class Bad(UniformMean):
        name = "Not a name"

    with pytest.raises(ValueError, match="taken"):
        register_strategy(Impostor)
    with pytest.raises(ValueError, match="lower-case word"):
        register_strategy(Bad)
    with pytest.raises(ValueError, match="built-in"):
        unregister_strategy("fedavg")
    assert "fedavg" in strategy_names()

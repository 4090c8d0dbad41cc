"""A tiny asymfedavg federation on the `fednnunet` preset (1, 2.5 and 4 mm slices), end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from fedseg.synth import generate
    from fedseg.federation.single_machine import SimulationConfig, simulate

    root = tmp_path_factory.mktemp("asymfedavg")
    generate(root / "sites", preset="fednnunet", seed=0)
    simulate(SimulationConfig(sites_root=root / "sites", strategy="asymfedavg", rounds=2, run_dir=root / "run",
                              iterations=1, workers=0))
    return root / "run"


def test_per_site_plans_differ(run: Path):
    from fedseg.planning.plans import load_plans

    plans = load_plans(run / "plans.json")
    configs = [plans.configuration_for(site) for site in sorted(plans.sites)]
    assert len({c.name for c in configs}) == 3
    assert len({tuple(round(s, 3) for s in c.spacing) for c in configs}) == 3
    assert len({tuple(c.patch_size) for c in configs}) == 3
    assert len({c.network.n_stages for c in configs}) == 2        # site_c's network is a stage shallower


def test_updates_hold_only_mapped_tensors_and_local_ones_stay(run: Path):
    from safetensors.numpy import load_file

    from fedseg.federation.manifest import expected_parameters
    from fedseg.federation.routes import route_table
    from fedseg.federation.weightfile import read_weight_file
    from fedseg.planning.plans import load_plans

    plans = load_plans(run / "plans.json")
    table = route_table(plans)
    shared = {site: {n: {"pool": r.pool, "key": r.key} for n, r in table.sent(site).items()} for site in table.sites}
    sent_shapes: dict[tuple[str, str], set] = {}
    for site in sorted(plans.sites):
        mapped = set(shared[site])
        assert mapped, f"{site} shares nothing"
        for r in (1, 2):
            tensors, meta = read_weight_file(run / f"round_{r:03d}" / "updates" / f"{site}.safetensors")
            assert set(tensors) == mapped
            assert meta.scopes == {name: entry["pool"] for name, entry in shared[site].items()}
            for name, array in tensors.items():
                entry = shared[site][name]
                sent_shapes.setdefault((entry["pool"], entry["key"]), set()).add(array.shape)
        local = load_file(str(run / "state" / site / "local.safetensors"))
        manifest = expected_parameters(plans, site)
        assert set(local) == set(manifest) - mapped
        assert set(local).isdisjoint(mapped)
        # what the site loads next is only its mapped tensors
        loaded, _ = read_weight_file(run / "round_002" / f"{site}.safetensors")
        assert set(loaded) == mapped
    # every pool key was sent with one shape by all of its sites
    assert all(len(shapes) == 1 for shapes in sent_shapes.values())
    assert any(pool == "global" for pool, _ in sent_shapes)

    # after aggregation the members of a pool hold the identical tensor
    models = {site: read_weight_file(run / "round_002" / f"{site}.safetensors")[0] for site in plans.sites}
    for name, entry in shared["site_a"].items():
        if entry["pool"] == "global":    # site_c's tensor at the same position (its own name)
            twin = next(n for n, e in shared["site_c"].items() if e == entry)
            np.testing.assert_array_equal(models["site_a"][name], models["site_c"][twin])
    # matched from the output, every site pools decoder tensors (site_c is a stage shallower)
    assert all(any(n.startswith("decoder.") for n in shared[site]) for site in plans.sites)
    report = (run / "report" / "metrics.json")
    assert report.is_file()


def test_round_zero_local_filters_follow_one_reference(run: Path):
    """site_a's first convolution is 3x3x3, site_b's and site_c's are 1x3x3: the thinner ones
    start as site_a's filters summed across slices, so the shared layer after them reads
    channels that mean the same at every site."""
    from fedseg.federation.weightfile import read_weight_file

    name = "encoder.stages.0.convs.0.conv.weight"
    start = {site: read_weight_file(run / "round_000" / f"{site}.safetensors")[0][name] for site in ("site_a", "site_b", "site_c")}
    assert start["site_a"].shape[2:] == (3, 3, 3) and start["site_c"].shape[2:] == (1, 3, 3)
    np.testing.assert_allclose(start["site_c"], start["site_a"].sum(axis=2, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(start["site_b"], start["site_c"])

"""The aggregation engine: FedAvg = Flower's aggregate, local keeps everything, validation battery."""

from __future__ import annotations

import hashlib
import json
from functools import reduce
from pathlib import Path

import numpy as np
import pytest

from fedseg.errors import InputError
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.routes import attach_routes
from fedseg.federation.site_update import compose_site_state, split_site_state, write_site_update
from fedseg.federation.strategies import get_strategy, strategy_names
from fedseg.federation.weightfile import WeightMeta, open_weight_file, read_weight_file, write_weight_file
from fedseg.planning.plans import (
    ConfigurationPlan,
    NetworkSpec,
    Plans,
    SiteInfo,
    StrategySpec,
)

MANIFEST = {
    "encoder.stages.0.conv.weight": {"shape": [4, 1, 3, 3, 3], "dtype": "float32"},
    "encoder.stages.0.conv.bias": {"shape": [4], "dtype": "float32"},
    "decoder.seg_layers.0.weight": {"shape": [2, 4, 1, 1, 1], "dtype": "float32"},
    "norm.num_batches_tracked": {"shape": [], "dtype": "int64"},
}
FLOAT_NAMES = [n for n, e in MANIFEST.items() if e["dtype"] == "float32"]
N_CASES = {"A": 3, "B": 5, "C": 8}


def make_plans(
    strategy: str = "fedavg", params: dict | None = None, sites: dict[str, int] | None = None, manifest: dict | None = None,
) -> Plans:
    network = NetworkSpec(
        n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]],
        n_conv_per_stage=[1, 1], n_conv_per_stage_decoder=[1],
    )
    config = ConfigurationPlan(
        name="3d_fullres", spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16], median_image_size_in_voxels=[16, 16, 16],
        batch_size=2, normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False], network=network,
    )
    return attach_routes(Plans(
        dataset_name="unit", channel_names={"0": "T1"}, labels={"background": 0, "lesion": 1}, file_ending=".nii.gz",
        fingerprint={}, sites={s: SiteInfo("MRI", ["T1"], n) for s, n in (sites or N_CASES).items()},
        strategy=StrategySpec(strategy, dict(params or {})), configurations={"3d_fullres": config},
        default_configuration="3d_fullres", extra={"manifests": {"3d_fullres": manifest or MANIFEST}},
    ))


def random_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {n: rng.standard_normal(e["shape"]).astype(np.float32) for n, e in MANIFEST.items() if e["dtype"] == "float32"}
    state["norm.num_batches_tracked"] = np.array(seed, dtype=np.int64)
    return state


def write_updates(plans: Plans, folder: Path, round_index: int = 1, sites=None) -> dict[str, Path]:
    paths = {}
    for i, site in enumerate(sites or sorted(plans.sites)):
        path = folder / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, random_state(i + 1), path, round_index=round_index, n_iterations=10)
        paths[site] = path
    return paths


def flower_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """flwr.server.strategy.aggregate.aggregate, verbatim in behaviour."""
    num_examples_total = sum(num_examples for (_, num_examples) in results)
    weighted_weights = [[layer * num_examples for layer in weights] for weights, num_examples in results]
    return [reduce(np.add, layer_updates) / num_examples_total for layer_updates in zip(*weighted_weights)]


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_registry() -> None:
    assert {"fedavg", "local"} <= set(strategy_names())
    with pytest.raises(InputError, match="known: .*fedavg"):
        get_strategy("fedprox-typo")


def test_fedavg_equals_flower_aggregate(tmp_path: Path) -> None:
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    report = aggregate_round(plans, list(paths.values()), tmp_path / "round_001")

    results = []
    for i, site in enumerate(sorted(plans.sites)):
        state = random_state(i + 1)
        results.append(([state[n] for n in FLOAT_NAMES], N_CASES[site]))
    expected = dict(zip(FLOAT_NAMES, flower_aggregate(results)))

    global_tensors, global_meta = read_weight_file(tmp_path / "round_001" / "models" / "global.safetensors")
    assert set(global_tensors) == set(FLOAT_NAMES)
    assert global_meta.kind == "model" and global_meta.site == "global" and global_meta.round == 1
    assert global_meta.n_cases == sum(N_CASES.values())
    for name in FLOAT_NAMES:
        assert global_tensors[name].dtype == np.float32
        np.testing.assert_allclose(global_tensors[name], expected[name], rtol=1e-6, atol=1e-6)

    for site in plans.sites:
        site_file = tmp_path / "round_001" / f"{site}.safetensors"
        tensors, meta = read_weight_file(site_file)
        assert meta.kind == "model" and meta.round == 1 and meta.plan_id == plans.plan_id
        assert set(tensors) == set(FLOAT_NAMES)  # the integer buffer never travels
        assert meta.scopes == {n: "global" for n in FLOAT_NAMES}
        for name in FLOAT_NAMES:
            np.testing.assert_array_equal(tensors[name], global_tensors[name])
        # every site loads exactly the global model: the site file is that file, not a copy
        assert site_file.read_bytes() == (tmp_path / "round_001" / "models" / "global.safetensors").read_bytes()
        assert meta.site == "global"

    total = sum(N_CASES.values())
    assert report.weights == {"global": {s: n / total for s, n in N_CASES.items()}}
    saved = json.loads((tmp_path / "round_001" / "aggregate.json").read_text())
    assert saved["round"] == 1 and saved["plan_id"] == plans.plan_id and saved["strategy"] == "fedavg"
    for record in saved["inputs"]:
        path = Path(record["path"])
        with open_weight_file(path) as reader:
            # a version-2 input is named by its verified content hash; its bytes are not hashed twice
            assert record["content_hash"] == reader.meta.content_hash and record["sha256"] is None
            norm = np.sqrt(sum(float(np.sum(reader.get_tensor(n).astype(np.float64) ** 2)) for n in reader.keys()))
        assert record["update_norm"] == pytest.approx(norm, rel=1e-6)
        assert record["n_cases"] == N_CASES[record["site"]]
    for record in saved["outputs"]:
        data = (tmp_path / "round_001" / record["path"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert saved["missing_sites"] == []


def test_aggregate_is_reproducible(tmp_path: Path) -> None:
    plans = make_plans()
    paths = list(write_updates(plans, tmp_path).values())
    first = aggregate_round(plans, paths, tmp_path / "r1")
    second = aggregate_round(plans, list(reversed(paths)), tmp_path / "r2")
    assert [o.sha256 for o in first.outputs] == [o.sha256 for o in second.outputs]


def test_uniform_weighting(tmp_path: Path) -> None:
    plans = make_plans(params={"weighting": "uniform"})
    paths = write_updates(plans, tmp_path)
    aggregate_round(plans, list(paths.values()), tmp_path / "out")
    tensors, _ = read_weight_file(tmp_path / "out" / "models" / "global.safetensors")
    name = FLOAT_NAMES[0]
    mean = np.mean([random_state(i + 1)[name].astype(np.float64) for i in range(3)], axis=0)
    np.testing.assert_allclose(tensors[name], mean, rtol=1e-6, atol=1e-6)


def test_unknown_strategy_param_is_refused(tmp_path: Path) -> None:
    plans = make_plans(params={"weighting": "bogus"})
    with pytest.raises(InputError, match="weighting"):
        aggregate_round(plans, [], tmp_path / "out")
    with pytest.raises(InputError, match="does not know"):
        aggregate_round(make_plans(params={"weigthing": "uniform"}), [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_strategy_keeps_everything_local(tmp_path: Path) -> None:
    plans = make_plans("local")
    paths = write_updates(plans, tmp_path)
    for path in paths.values():
        tensors, meta = read_weight_file(path)
        assert tensors == {} and meta.scopes == {}
    report = aggregate_round(plans, list(paths.values()), tmp_path / "out")
    assert not (tmp_path / "out" / "models").exists()
    for site in plans.sites:
        tensors, meta = read_weight_file(tmp_path / "out" / f"{site}.safetensors")
        assert tensors == {} and meta.kind == "model"
    assert {o.name for o in report.outputs} == set(plans.sites)
    # what the site trains next = its own state: nothing came in to replace it
    own = random_state(1)
    composed = compose_site_state(plans, "A", tmp_path / "out" / "A.safetensors", own)
    for name in MANIFEST:
        np.testing.assert_array_equal(composed[name], own[name])


def test_missing_site_still_gets_the_global_model(tmp_path: Path) -> None:
    plans = make_plans(params={"min_sites": 2})
    paths = write_updates(plans, tmp_path, sites=["A", "C"])
    report = aggregate_round(plans, list(paths.values()), tmp_path / "out")
    assert report.missing_sites == ["B"]
    b, meta = read_weight_file(tmp_path / "out" / "B.safetensors")
    g, _ = read_weight_file(tmp_path / "out" / "models" / "global.safetensors")
    assert meta.kind == "model" and meta.round == 1
    for name in FLOAT_NAMES:
        np.testing.assert_array_equal(b[name], g[name])


def test_split_and_compose_site_state(tmp_path: Path) -> None:
    plans = make_plans()
    state = random_state(3)
    shared, local = split_site_state(plans, "A", state)
    assert set(shared) == set(FLOAT_NAMES) and set(local) == {"norm.num_batches_tracked"}
    paths = write_updates(plans, tmp_path)
    aggregate_round(plans, list(paths.values()), tmp_path / "out")
    composed = compose_site_state(plans, "A", tmp_path / "out" / "A.safetensors", local)
    assert list(composed) == list(MANIFEST)
    assert composed["norm.num_batches_tracked"] == 3
    # without a local copy of the local-only tensor the model is incomplete
    with pytest.raises(InputError, match="num_batches_tracked"):
        compose_site_state(plans, "A", tmp_path / "out" / "A.safetensors", None)
    # another site's file is refused (local strategy: every site file is the site's own)
    local_plans = make_plans("local")
    paths = write_updates(local_plans, tmp_path / "local")
    aggregate_round(local_plans, list(paths.values()), tmp_path / "local_out")
    with pytest.raises(InputError, match="not 'A'"):
        compose_site_state(local_plans, "A", tmp_path / "local_out" / "B.safetensors", state)
    # an update is not a model
    with pytest.raises(InputError, match="'update' file"):
        compose_site_state(local_plans, "A", paths["A"], state)


# -- validation battery: each bad input -> InputError naming the file, nothing written --------
def _rewrite(path: Path, mutate_tensors=None, **meta_changes) -> None:
    tensors, meta = read_weight_file(path)
    if mutate_tensors:
        mutate_tensors(tensors, meta)
    fields = {**meta.__dict__, **meta_changes}
    fields.pop("content_hash")
    write_weight_file(path, tensors, WeightMeta(**fields))


def _drop(t, m):
    name = FLOAT_NAMES[0]
    del t[name]
    del m.scopes[name]


def _extra(t, m):
    t["stowaway"] = np.zeros(3, np.float32)
    m.scopes["stowaway"] = "global"


def _shape(t, m):
    t[FLOAT_NAMES[1]] = np.zeros(5, np.float32)


def _dtype(t, m):
    t[FLOAT_NAMES[1]] = t[FLOAT_NAMES[1]].astype(np.float64)


def _nan(t, m):
    t[FLOAT_NAMES[0]] = t[FLOAT_NAMES[0]].copy()
    t[FLOAT_NAMES[0]].flat[5] = np.nan


def _inf(t, m):
    t[FLOAT_NAMES[2]] = t[FLOAT_NAMES[2]].copy()
    t[FLOAT_NAMES[2]].flat[0] = -np.inf


def _local_sent(t, m):
    t["norm.num_batches_tracked"] = np.array(1, np.int64)


def _scope(t, m):
    m.scopes[FLOAT_NAMES[0]] = "group:MRI"


BATTERY = {
    "wrong plan_id": (dict(plan_id="0" * 64), "another plan"),
    "wrong strategy": (dict(strategy="local"), "strategy 'local'"),
    "unknown site": (dict(site="Z"), "not in the plan"),
    "model not update": (dict(kind="model"), "expected an update"),
    "round zero": (dict(round=0), "round 0"),
    "zero cases": (dict(n_cases=0), "n_cases 0"),
    "missing tensor": ((_drop,), "missing 1 tensor"),
    "extra tensor": ((_extra,), "stowaway"),
    "local tensor sent": ((_local_sent,), "num_batches_tracked"),
    "wrong shape": ((_shape,), "shape [5]"),
    "wrong dtype": ((_dtype,), "dtype float64"),
    "wrong scope": ((_scope,), "group:MRI"),
    "NaN": ((_nan,), "non-finite"),
    "inf": ((_inf,), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BATTERY))
def test_validation_battery(tmp_path: Path, case: str) -> None:
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    change, fragment = BATTERY[case]
    victim = paths["B"]
    if isinstance(change, tuple):
        _rewrite(victim, change[0])
    else:
        _rewrite(victim, **change)
    out = tmp_path / "round_001"
    with pytest.raises(InputError) as info:
        aggregate_round(plans, list(paths.values()), out)
    message = str(info.value)
    assert str(victim) in message and fragment in message, message
    assert not out.exists()


def test_mixed_rounds_and_expected_round(tmp_path: Path) -> None:
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    _rewrite(paths["C"], round=2)
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        aggregate_round(plans, list(paths.values()), out)
    assert str(paths["C"]) in str(info.value) and "round 2" in str(info.value)
    paths = write_updates(plans, tmp_path)
    with pytest.raises(InputError, match="expected round 2"):
        aggregate_round(plans, list(paths.values()), out, expected_round=2)
    assert not out.exists()


def test_duplicate_site(tmp_path: Path) -> None:
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    copy = tmp_path / "copy_of_A.safetensors"
    copy.write_bytes(paths["A"].read_bytes())
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        aggregate_round(plans, [*paths.values(), copy], out)
    assert str(copy) in str(info.value) and "second update from site 'A'" in str(info.value)
    assert not out.exists()


def test_norm_bound(tmp_path: Path) -> None:
    unbounded = make_plans()
    paths = write_updates(unbounded, tmp_path)
    norms = {r.site: r.update_norm for r in aggregate_round(unbounded, list(paths.values()), tmp_path / "r").inputs}
    bound = (sorted(norms.values())[1] + sorted(norms.values())[2]) / 2  # only the largest exceeds it
    plans = make_plans(params={"max_update_norm": bound})
    paths = write_updates(plans, tmp_path)
    worst = max(norms, key=norms.get)
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        aggregate_round(plans, list(paths.values()), out)
    assert str(paths[worst]) in str(info.value) and "max_update_norm" in str(info.value)
    assert not out.exists()


def test_corrupt_update_is_refused_before_writing(tmp_path: Path) -> None:
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    data = bytearray(paths["C"].read_bytes())
    data[-3] ^= 0xFF
    paths["C"].write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="content hash mismatch"):
        aggregate_round(plans, list(paths.values()), out)
    assert listing(out) == {"keep.txt"}


def test_plans_without_manifest_are_refused(tmp_path: Path) -> None:
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    bare = make_plans()
    bare.extra = {}
    with pytest.raises(InputError, match="manifest"):
        aggregate_round(bare, list(paths.values()), tmp_path / "out")


# -- with the real network (written in fedseg.training) --------------------------------------
def test_attach_manifests_and_initial_round(tmp_path: Path) -> None:
    pytest.importorskip("fedseg.training.network")
    from fedseg.federation.round_zero import initial_round
    from fedseg.federation.plan_building import attach_manifests

    plans = make_plans()
    plans.extra = {}
    plans = attach_manifests(plans)
    manifest = plans.extra["manifests"]["3d_fullres"]
    assert any(name.startswith("encoder.stages.0") for name in manifest)
    written = initial_round(plans, tmp_path / "round_000")
    assert tmp_path / "round_000" / "models" / "global.safetensors" in written
    states = {site: read_weight_file(tmp_path / "round_000" / f"{site}.safetensors") for site in plans.sites}
    g, _ = read_weight_file(tmp_path / "round_000" / "models" / "global.safetensors")
    for site, (tensors, meta) in states.items():
        assert meta.round == 0 and meta.kind == "model" and meta.site == site
        assert {n: (list(a.shape), a.dtype.name) for n, a in tensors.items()} == {
            n: (e["shape"], e["dtype"]) for n, e in manifest.items()
        }
        for name in g:
            np.testing.assert_array_equal(tensors[name], g[name])
    # same seed -> bit-identical files
    initial_round(plans, tmp_path / "again")
    for site in plans.sites:
        assert (tmp_path / "again" / f"{site}.safetensors").read_bytes() == (
            tmp_path / "round_000" / f"{site}.safetensors"
        ).read_bytes()
    # a round trip through a site and aggregate works with the real parameter names
    state = compose_site_state(plans, "A", tmp_path / "round_000" / "A.safetensors", None)
    for i, site in enumerate(sorted(plans.sites)):
        write_site_update(plans, site, state, tmp_path / "u" / f"{site}.safetensors", round_index=1, n_iterations=1)
    aggregate_round(plans, sorted((tmp_path / "u").iterdir()), tmp_path / "round_001")
    g1, _ = read_weight_file(tmp_path / "round_001" / "models" / "global.safetensors")
    for name in g1:
        np.testing.assert_allclose(g1[name], state[name], rtol=1e-6, atol=1e-7)

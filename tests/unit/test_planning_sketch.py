"""The quantile sketch: the stated relative-error bound holds, and merging is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.planning.sketch import DEFAULT_ALPHA, QuantileSketch

QS = np.array([0.0, 0.001, 0.005, 0.01, 0.1, 0.25, 0.37, 0.5, 0.75, 0.9, 0.99, 0.995, 0.999, 1.0])
# float64 rounding at bucket edges may add ~1e-15 to the bound
SLACK = 1e-12


def datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "lognormal (skewed)": rng.lognormal(3.0, 1.5, 200_000).astype(np.float32),
        "negative": -rng.gamma(2.0, 50.0, 100_000),
        "mixed with zeros": np.concatenate([rng.normal(0, 300, 100_000), np.zeros(20_000),
                                            rng.integers(-1024, 3000, 50_000)]).astype(np.float32),
        "tiny and huge": np.concatenate([rng.uniform(1e-6, 1e-3, 5_000), rng.uniform(1e5, 1e7, 5_000)]),
        "few values": np.array([3.0, -1.5, 0.0, 7.25]),
    }


@pytest.mark.parametrize("name", list(datasets()))
def test_quantile_within_stated_bound_of_numpy(name):
    values = datasets()[name]
    sketch = QuantileSketch().add(values)
    pooled = values.astype(np.float64)

    # DDSketch's rank rule: within alpha of np.percentile(method="lower")
    lower = np.percentile(pooled, QS * 100, method="lower")
    est = sketch.quantile(QS)
    assert np.all(np.abs(est - lower) <= DEFAULT_ALPHA * np.abs(lower) + SLACK)

    # linear interpolation (nnU-Net's np.percentile): within alpha of the bracketing order statistics
    linear = np.percentile(pooled, QS * 100)
    upper = np.percentile(pooled, QS * 100, method="higher")
    est_lin = sketch.quantile(QS, interpolation="linear")
    bound = DEFAULT_ALPHA * np.maximum(np.abs(lower), np.abs(upper)) + SLACK
    assert np.all(np.abs(est_lin - linear) <= bound)

    assert sketch.quantile(0.0) == pooled.min() and sketch.quantile(1.0) == pooled.max()
    assert sketch.count == pooled.size
    assert sketch.mean == pytest.approx(pooled.mean(), rel=1e-12, abs=1e-9)
    assert sketch.std == pytest.approx(pooled.std(), rel=1e-9)


def test_bound_holds_for_other_alpha():
    values = np.random.default_rng(1).standard_cauchy(50_000)
    sketch = QuantileSketch(alpha=0.02).add(values)
    lower = np.percentile(values, QS * 100, method="lower")
    assert np.all(np.abs(sketch.quantile(QS) - lower) <= 0.02 * np.abs(lower) + SLACK)
    assert sketch.to_dict()["alpha"] == 0.02
    assert "0.02" in sketch.to_dict()["guarantee"]


def test_merge_of_parts_equals_sketch_of_whole_exactly():
    values = datasets()["mixed with zeros"]
    parts = np.array_split(np.random.default_rng(3).permutation(values), 5)
    merged = QuantileSketch()
    for part in parts:
        merged.merge(QuantileSketch().add(part))
    whole = QuantileSketch().add(values)
    a, b = merged.to_dict(), whole.to_dict()
    for key in ("count", "min", "max", "zero_count", "positive", "negative"):
        assert a[key] == b[key], key
    assert a["sum"] == pytest.approx(b["sum"], rel=1e-12)
    assert a["sumsq"] == pytest.approx(b["sumsq"], rel=1e-12)
    np.testing.assert_array_equal(merged.quantile(QS), whole.quantile(QS))


def test_merge_is_order_independent_and_refuses_other_alpha():
    rng = np.random.default_rng(5)
    parts = [rng.normal(100, 20, 1000), rng.normal(-5, 1, 10), rng.exponential(3, 500)]
    ab = QuantileSketch().add(parts[0]).merge(QuantileSketch().add(parts[1])).merge(QuantileSketch().add(parts[2]))
    ba = QuantileSketch().add(parts[2]).merge(QuantileSketch().add(parts[0])).merge(QuantileSketch().add(parts[1]))
    assert ab.to_dict()["positive"] == ba.to_dict()["positive"]
    assert ab.to_dict()["negative"] == ba.to_dict()["negative"]
    with pytest.raises(ValueError, match="accuracy"):
        ab.merge(QuantileSketch(alpha=0.01).add([1.0]))


def test_json_round_trip_is_compact_and_exact():
    values = datasets()["mixed with zeros"]
    sketch = QuantileSketch().add(values)
    d = sketch.to_dict()
    text = json.dumps(d)
    assert len(text) < 100_000          # sparse buckets, not the values
    again = QuantileSketch.from_dict(json.loads(text))
    assert again == sketch
    np.testing.assert_array_equal(again.quantile(QS), sketch.quantile(QS))
    assert again.sum == sketch.sum and again.sumsq == sketch.sumsq


def test_bad_input_refused():
    with pytest.raises(ValueError):
        QuantileSketch().add([1.0, np.nan])
    with pytest.raises(ValueError):
        QuantileSketch().add([np.inf])
    with pytest.raises(ValueError):
        QuantileSketch().quantile(0.5)
    with pytest.raises(ValueError):
        QuantileSketch().add([1.0]).quantile(1.5)
    with pytest.raises(ValueError):
        QuantileSketch.from_dict({"format": "something else"})
    broken = QuantileSketch().add([1.0, 2.0]).to_dict()
    broken["count"] = 3
    with pytest.raises(ValueError, match="add up"):
        QuantileSketch.from_dict(broken)


def test_empty_add_and_empty_merge_change_nothing():
    sketch = QuantileSketch().add([2.0, 4.0])
    before = sketch.to_dict()
    sketch.add(np.array([], dtype=np.float32)).merge(QuantileSketch())
    assert sketch.to_dict() == before
    assert QuantileSketch().merge(sketch).to_dict() == before


def test_ten_million_values_under_a_second():
    import time

    values = np.random.default_rng(0).normal(200, 80, 10_000_000).astype(np.float32)
    start = time.perf_counter()
    QuantileSketch().add(values)
    assert time.perf_counter() - start < 1.0

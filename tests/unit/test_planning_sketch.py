"""The quantile sketch: the stated relative-error bounds hold (counts and weights), and merging is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg.planning.sketch import DEFAULT_ALPHA, WEIGHT_UNIT, QuantileSketch

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
    broken["count"] = broken["weight"] = 3
    with pytest.raises(ValueError, match="add up"):
        QuantileSketch.from_dict(broken)
    broken = QuantileSketch().add([1.0, 2.0]).to_dict()
    broken["positive"] = {k: -1 for k in broken["positive"]}
    with pytest.raises(ValueError, match="non-negative"):
        QuantileSketch.from_dict(broken)
    old = QuantileSketch().add([1.0]).to_dict()
    old["version"] = 1
    with pytest.raises(ValueError, match="version"):
        QuantileSketch.from_dict(old)


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


# -- weighted sketches ------------------------------------------------------------------------

def cases_of(seed: int = 11) -> list[np.ndarray]:
    """Cases of very different sizes and levels: case weighting and voxel weighting disagree."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal(300, 40, 50_000).astype(np.float32),
        rng.normal(-80, 30, 700),
        rng.gamma(2.0, 100.0, 9_000),
        np.concatenate([np.zeros(300), rng.integers(-1024, 3000, 4_000)]).astype(np.float32),
        np.array([12.5]),
        rng.lognormal(2.0, 1.0, 20_000),
    ]


def case_weighted_sketch(cases: list[np.ndarray]) -> QuantileSketch:
    sketch = QuantileSketch(weighted=True)
    for case in cases:
        sketch.add(case, weight=1.0 / case.size)
    return sketch


def weighted_inverted_cdf(values: np.ndarray, weights: np.ndarray, qs: np.ndarray, tol: float) -> list[np.ndarray]:
    """For each q, the sorted values x_(i) whose cumulative weight C_i first reaches q*W.

    Rank rule (weighted inverted CDF): i = the smallest index with C_i >= q * W, C_i the sum of
    the weights of x_(0..i) in ascending order, W the total weight. The sketch rounds bucket
    weights to multiples of 2**-30, so where q*W lies within `tol` of some C_i either
    neighbour is the right answer; every such candidate is returned.
    """
    order = np.argsort(values, kind="stable")
    v, cum = values[order], np.cumsum(weights[order])
    total = cum[-1]
    out = []
    for q in qs:
        lo = np.searchsorted(cum, q * total - tol, side="left")
        hi = np.searchsorted(cum, q * total + tol, side="left")
        out.append(v[min(lo, v.size - 1): min(hi, v.size - 1) + 1])
    return out


def test_weighted_quantile_within_stated_bound_of_weighted_inverted_cdf():
    cases = cases_of()
    sketch = case_weighted_sketch(cases)
    values = np.concatenate([c.astype(np.float64) for c in cases])
    weights = np.concatenate([np.full(c.size, 1.0 / c.size) for c in cases])
    n_buckets = len(sketch.to_dict()["positive"]) + len(sketch.to_dict()["negative"]) + 1
    tol = 0.5 * WEIGHT_UNIT * n_buckets * len(cases)         # the 2**-30 rounding, at most
    est = sketch.quantile(QS)
    for q, e, candidates in zip(QS, est, weighted_inverted_cdf(values, weights, QS, tol)):
        assert np.any(np.abs(e - candidates) <= DEFAULT_ALPHA * np.abs(candidates) + SLACK), q
        # numpy's own weighted inverted CDF (numpy >= 2) is one of the candidates
        assert np.quantile(values, q, weights=weights, method="inverted_cdf") in candidates
    assert sketch.quantile(0.0) == values.min() and sketch.quantile(1.0) == values.max()
    assert "inverted_cdf" in sketch.to_dict()["guarantee"] and sketch.to_dict()["weighted"] is True

    # exact moments: the mean of the case means, E[x^2] the mean of the cases' mean squares
    assert sketch.count == values.size and sketch.weight == pytest.approx(len(cases), rel=1e-15)
    assert sketch.mean == pytest.approx(np.mean([c.astype(np.float64).mean() for c in cases]), rel=1e-12)
    assert sketch.mean == pytest.approx(np.average(values, weights=weights), rel=1e-12)
    assert sketch.std == pytest.approx(np.sqrt(np.cov(values, aweights=weights, ddof=0)), rel=1e-9)
    assert sketch.min == values.min() and sketch.max == values.max()


def test_weighted_merge_is_exact_and_grouping_independent():
    cases = cases_of(3)
    unweighted = [QuantileSketch().add(c) for c in cases]
    # bucket the voxels once, then merge with a weight: the same as adding the values with that weight
    reused = QuantileSketch(weighted=True)
    for case, sketch in zip(cases, unweighted):
        reused.merge(sketch, weight=1.0 / case.size)
    assert reused == case_weighted_sketch(cases)

    # sites of different groupings, merged in different orders: identical buckets (integer sums)
    sites_a = [case_weighted_sketch(cases[:2]), case_weighted_sketch(cases[2:5]), case_weighted_sketch(cases[5:])]
    sites_b = [case_weighted_sketch(cases[4:]), case_weighted_sketch(cases[:1]), case_weighted_sketch(cases[1:4])]
    merged_a, merged_b = QuantileSketch(weighted=True), QuantileSketch(weighted=True)
    for site in sites_a:
        merged_a.merge(site)
    for site in sites_b:
        merged_b.merge(site)
    a, b, whole = merged_a.to_dict(), merged_b.to_dict(), reused.to_dict()
    for key in ("count", "min", "max", "zero_count", "positive", "negative"):
        assert a[key] == b[key] == whole[key], key
    for key in ("weight", "sum", "sumsq"):
        assert a[key] == pytest.approx(whole[key], rel=1e-12) and b[key] == pytest.approx(whole[key], rel=1e-12)
    np.testing.assert_array_equal(merged_a.quantile(QS), reused.quantile(QS))

    again = QuantileSketch.from_dict(json.loads(json.dumps(whole)))
    assert again == reused and again.weighted and again.weight == reused.weight


def test_unit_weights_agree_with_counts():
    values = datasets()["mixed with zeros"]
    counted = QuantileSketch().add(values)
    weighted = QuantileSketch(weighted=True).add(values, weight=1.0)
    assert weighted.weight == counted.count and weighted.sum == counted.sum
    np.testing.assert_array_equal(weighted.quantile(QS), counted.quantile(QS, interpolation="inverted_cdf"))


def test_weighted_misuse_refused():
    with pytest.raises(ValueError, match="weighted=True"):
        QuantileSketch().add([1.0], weight=0.5)
    with pytest.raises(ValueError, match="weighted=True"):
        QuantileSketch().merge(QuantileSketch(weighted=True).add([1.0], weight=0.5))
    with pytest.raises(ValueError, match="positive"):
        QuantileSketch(weighted=True).add([1.0], weight=0.0)
    with pytest.raises(ValueError, match="inverted_cdf"):
        QuantileSketch(weighted=True).add([1.0, 2.0], weight=0.5).quantile(0.5, interpolation="linear")
    tampered = QuantileSketch(weighted=True).add([1.0, 2.0], weight=0.5).to_dict()
    tampered["weight"] = 3.0
    with pytest.raises(ValueError, match="add up"):
        QuantileSketch.from_dict(tampered)
    tampered["weight"], tampered["bucket_unit"] = 1.0, 1.0
    with pytest.raises(ValueError, match="bucket_unit"):
        QuantileSketch.from_dict(tampered)


def test_case_weighting_a_large_case_is_cheap():
    import time

    case = QuantileSketch().add(np.random.default_rng(0).normal(0, 500, 2_000_000))
    start = time.perf_counter()
    for _ in range(100):
        QuantileSketch(weighted=True).merge(case, weight=1.0 / case.count)
    assert time.perf_counter() - start < 0.5            # per-bucket work only: no voxel is touched again

"""A mergeable quantile sketch with a relative-error guarantee (DDSketch-style log buckets).

Why a sketch: a site must not send its voxels, yet the coordinator needs quantiles of the
foreground intensities pooled over every site (nnU-Net's percentile_00_5, median,
percentile_99_5). Quantiles of a union cannot be derived from per-site quantiles, but they
can be read off a histogram, and histograms add. The histogram here has logarithmically
spaced buckets, so a bucket's representative value is within a fixed *relative* error of
everything that fell into it, whatever the scale of the data (CT in Hounsfield units, MRI in
arbitrary units, US in 0..255).

Buckets (Masson, Rim & Lee, "DDSketch", VLDB 2019): with gamma = (1 + alpha) / (1 - alpha),
a positive value x goes to key k = ceil(log_gamma(x)), the bucket (gamma^(k-1), gamma^k];
the bucket's representative 2 * gamma^k / (gamma + 1) is within relative error alpha of every
value in it. Negative values go to a separate store keyed by |x|, exact zeros to a counter.

Unweighted sketches (the default) count values. Guarantee (stated in
`to_dict()["guarantee"]`): for 0 <= q <= 1 and n values, ``quantile(q)`` returns v with
|v - x_(r)| <= alpha * |x_(r)|, where x_(r) is the sorted value of 0-based rank
r = floor(q * (n - 1)) — exactly ``np.percentile(values, 100 * q, method="lower")``. This is
DDSketch's interpolation-free rank rule.

nnU-Net computes its percentiles with ``np.percentile``'s default *linear* interpolation,
p = x_(r) + f * (x_(r+1) - x_(r)) with f = q * (n - 1) - r. ``quantile(q,
interpolation="linear")`` estimates both neighbours and interpolates the same way, so it is
within alpha * max(|x_(r)|, |x_(r+1)|) of p (within relative error alpha of p whenever the
two neighbours share a sign, i.e. everywhere except across a sign change).

Weighted sketches (``QuantileSketch(weighted=True)``) give values fractional weights:
``add(values, weight=w)`` or ``merge(unweighted_sketch, weight=w)``. fedseg uses them to give
every *case* the same total weight (w = 1 / the case's foreground voxel count), which is what
nnU-Net's equal number of random samples per case estimates. Guarantee: ``quantile(q)``
returns v within relative error alpha of the weighted inverted-CDF value x_(i), the smallest
sorted value whose cumulative weight reaches q * (total weight) —
``np.quantile(values, q, weights=w, method="inverted_cdf")``. Bucket weights are kept as
integer multiples of 2**-30 (each bucket's weight rounded to that grid when a weighted part
is added, an error of at most 2**-31 per bucket and part), so merging — integer addition —
is exact, associative and order-independent, exactly as for counts; the rounding can move
the selected rank only where q * (total weight) lies within that rounding of a cumulative
weight, i.e. at ties between two neighbouring values.

Alongside the buckets every sketch keeps the exact number of values, the total weight, the
weighted sum and sum of squares (float64), and the exact min and max, so the (weighted) mean
and standard deviation of a merged sketch are exact to float precision; quantile estimates
are clamped to [min, max] and the extreme ranks return the exact min / max.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedseg.planning.sketch_bounds import MAX_CONTENTS, READ_ALPHA_RANGE, bucket_key, finite_number, nonnegative_int
from fedseg.planning.sketch_buckets import BucketStore, add_sparse, add_trimmed, bucket_chunk, scaled

__all__ = ["DEFAULT_ALPHA", "MAX_CONTENTS", "READ_ALPHA_RANGE", "SKETCH_FORMAT", "SKETCH_FORMAT_VERSION",
           "WEIGHT_UNIT", "WEIGHT_UNIT_BITS", "QuantileSketch"]

SKETCH_FORMAT = "fedseg.ddsketch"
SKETCH_FORMAT_VERSION = 2
# 0.5 % relative error: far below the spread of intensity percentiles across scanners, and
# it keeps a channel's sketch to a few thousand buckets for any realistic intensity range.
DEFAULT_ALPHA = 0.005
# Values are bucketed in chunks of this many: the float64 work buffers (0.5 MiB each) stay in
# cache and are reused, instead of page-faulting in whole-array temporaries.
_CHUNK = 1 << 16
# Weighted buckets hold integer multiples of 2**-30: integer sums are exact and associative
# (a float sum of per-case weights like 1/4913 would depend on the merge order), int64 holds
# total weights up to 2**33 (8.6e9 cases), and a case's bucket of weight 1e-9 (one voxel of a
# billion-voxel foreground) still counts.
WEIGHT_UNIT_BITS = 30
WEIGHT_UNIT = 2.0 ** -WEIGHT_UNIT_BITS
_INTERPOLATIONS = ("lower", "linear", "inverted_cdf")


class QuantileSketch:
    """Mergeable summary of a (weighted) multiset of real numbers: exact moments + quantile buckets.

    >>> sketch = QuantileSketch().add(np.arange(1, 1001))
    >>> round(sketch.quantile(0.5))    # the 500th value, within 0.5 %
    500
    >>> cases = QuantileSketch(weighted=True)
    >>> _ = cases.add([1.0, 1.0, 1.0], weight=1 / 3).add([10.0], weight=1.0)   # two cases, weight 1 each
    >>> cases.mean, cases.weight
    (5.5, 2.0)
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, weighted: bool = False) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), not {alpha}")
        self.alpha = float(alpha)
        self.weighted = bool(weighted)
        self._gamma = (1.0 + self.alpha) / (1.0 - self.alpha)
        self._log_gamma = math.log(self._gamma)
        self.count = 0              # number of values added
        self._weight = 0.0          # total weight (weighted sketches; == count otherwise)
        self.sum = 0.0              # weighted sum
        self.sumsq = 0.0            # weighted sum of squares
        self.min = math.inf
        self.max = -math.inf
        # Bucket contents are integers: counts, or multiples of WEIGHT_UNIT when weighted.
        self.zero_count = 0
        self._positive = BucketStore()
        self._negative = BucketStore()   # keyed by |x|

    @property
    def weight(self) -> float:
        """Total weight of the values (their number for an unweighted sketch)."""
        return self._weight if self.weighted else float(self.count)

    @property
    def bucket_unit(self) -> float:
        """What one unit of a bucket's integer content weighs: 1 (a count) or 2**-30."""
        return WEIGHT_UNIT if self.weighted else 1.0

    # -- adding ----------------------------------------------------------------------------
    def add(self, values: Any, weight: float | None = None) -> QuantileSketch:
        """Add every value of an array (any shape, any real dtype), each with `weight`. Returns self.

        `weight` (> 0) needs a weighted sketch; an unweighted sketch takes weight 1 only.
        Vectorised and streamed in cache-sized chunks with reused buffers (allocating
        whole-array temporaries costs more than the arithmetic): 1e7 values take well
        under a second.
        """
        if self.weighted:
            return self.merge(QuantileSketch(self.alpha).add(values), weight=1.0 if weight is None else weight)
        if weight is not None and weight != 1:
            raise ValueError("an unweighted sketch takes weight 1 only; use QuantileSketch(weighted=True)")
        v = np.asarray(values).ravel()
        if v.size == 0:
            return self
        if not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
            raise ValueError(f"cannot add values of dtype {v.dtype} to a quantile sketch")
        vmin, vmax = float(v.min()), float(v.max())
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            raise ValueError("cannot add NaN or infinite values to a quantile sketch")
        n = min(v.size, _CHUNK)
        magnitude = np.empty(n, dtype=np.float64)   # float64: float32 logs misplace values near bucket edges
        scratch = np.empty(n, dtype=np.float64)
        keys = np.empty(n, dtype=np.int64)
        inv_log_gamma = 1.0 / self._log_gamma
        total = 0.0
        total_sq = 0.0
        for start in range(0, v.size, _CHUNK):
            chunk = v[start: start + _CHUNK]
            m, s, k = magnitude[: chunk.size], scratch[: chunk.size], keys[: chunk.size]
            np.copyto(m, chunk, casting="unsafe")
            total += float(np.sum(m))
            np.square(m, out=s)
            total_sq += float(np.sum(s))
            self.zero_count += bucket_chunk(self._positive, self._negative, chunk, m, k, inv_log_gamma,
                                            all_positive=vmin > 0.0)
        self.count += int(v.size)
        self.sum += total
        self.sumsq += total_sq
        self.min = min(self.min, vmin)
        self.max = max(self.max, vmax)
        return self

    def merge(self, other: QuantileSketch, weight: float = 1.0) -> QuantileSketch:
        """Add `other`'s contents to this sketch, each of its values' weight times `weight`. Returns self.

        Bucket contents add as integers, so merging is exact and order-independent. A weighted
        sketch takes any other sketch and any weight > 0 (the typical use: merge the unweighted
        sketch of one case with weight 1 / its count, reusing its buckets); an unweighted sketch
        takes unweighted sketches with weight 1 only.
        """
        if not math.isclose(self.alpha, other.alpha, rel_tol=0.0, abs_tol=1e-15):
            raise ValueError(f"cannot merge sketches of different accuracy ({self.alpha} vs {other.alpha})")
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0.0):
            raise ValueError(f"merge weight must be a positive finite number, not {weight}")
        if not self.weighted and (other.weighted or weight != 1.0):
            raise ValueError("an unweighted sketch merges unweighted sketches with weight 1 only; "
                             "use QuantileSketch(weighted=True)")
        if other.count == 0:
            return self
        if self.weighted:
            # other's integer buckets -> this sketch's 2**-30 grid; 1.0 when copying a weighted sketch as is.
            factor = weight * (other.bucket_unit / WEIGHT_UNIT)
            biggest = max(int(s.counts.max(initial=0)) for s in (other._positive, other._negative)) + other.zero_count
            if biggest * factor >= 2.0 ** 62:
                raise ValueError(f"merge weight {weight} is too large for the sketch's integer bucket weights")
            for mine, theirs in ((self._positive, other._positive), (self._negative, other._negative)):
                add_trimmed(mine, theirs.offset, scaled(theirs.counts, factor))
            self.zero_count += int(scaled(np.array([other.zero_count], dtype=np.int64), factor)[0])
            self._weight += weight * other.weight
            self.sum += weight * other.sum
            self.sumsq += weight * other.sumsq
        else:
            self._positive.add_counts(other._positive.offset, other._positive.counts)
            self._negative.add_counts(other._negative.offset, other._negative.counts)
            self.zero_count += other.zero_count
            self.sum += other.sum
            self.sumsq += other.sumsq
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def copy(self) -> QuantileSketch:
        return QuantileSketch.from_dict(self.to_dict())

    # -- moments ---------------------------------------------------------------------------
    @property
    def mean(self) -> float:
        """(Weighted) mean; exact to float precision."""
        return self.sum / self.weight if self.count else math.nan

    @property
    def variance(self) -> float:
        """(Weighted) population variance (as np.var / np.std with ddof=0, which nnU-Net uses)."""
        if not self.count:
            return math.nan
        mean = self.mean
        return max(self.sumsq / self.weight - mean * mean, 0.0)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    # -- quantiles -------------------------------------------------------------------------
    def _ordered_buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """(cumulative integer contents, representative values) of all buckets in ascending value order."""
        neg_keys, neg_counts = self._negative.nonzero_items()
        pos_keys, pos_counts = self._positive.nonzero_items()
        neg_keys, neg_counts = neg_keys[::-1], neg_counts[::-1]   # most negative first
        counts = np.concatenate([neg_counts, [self.zero_count], pos_counts]).astype(np.int64)
        values = np.concatenate([-self._representative(neg_keys), [0.0], self._representative(pos_keys)])
        return np.cumsum(counts), values

    def _representative(self, keys: np.ndarray) -> np.ndarray:
        return 2.0 * np.exp(keys.astype(np.float64) * self._log_gamma) / (self._gamma + 1.0)

    def _order_statistics(self, ranks: np.ndarray) -> np.ndarray:
        """Estimates of the sorted values of the given 0-based integer ranks (unweighted sketches)."""
        cumulative, values = self._ordered_buckets()
        idx = np.searchsorted(cumulative, ranks, side="right")
        est = values[np.minimum(idx, values.size - 1)]
        est = np.clip(est, self.min, self.max)
        est = np.where(ranks == 0, self.min, est)                 # the extremes are known exactly
        return np.where(ranks == self.count - 1, self.max, est)

    def _inverted_cdf(self, qs: np.ndarray) -> np.ndarray:
        """The bucket where the cumulative weight first reaches q * total weight."""
        cumulative, values = self._ordered_buckets()
        idx = np.searchsorted(cumulative, qs * float(cumulative[-1]), side="left")
        est = np.clip(values[np.minimum(idx, values.size - 1)], self.min, self.max)
        est = np.where(qs == 0.0, self.min, est)                  # the extremes are known exactly
        return np.where(qs == 1.0, self.max, est)

    def quantile(self, q: float | np.ndarray, interpolation: str | None = None) -> float | np.ndarray:
        """Estimate the q-quantile (0 <= q <= 1); an array of q gives an array.

        interpolation="lower" (the default of unweighted sketches, DDSketch's rule): within
        relative error alpha of np.percentile(values, 100*q, method="lower").
        interpolation="linear": numpy's default (and nnU-Net's) definition, see the module
        docstring for its bound. interpolation="inverted_cdf" (the default, and the only rule,
        of weighted sketches): within relative error alpha of
        np.quantile(values, q, weights=w, method="inverted_cdf").
        """
        if interpolation is None:
            interpolation = "inverted_cdf" if self.weighted else "lower"
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, not {interpolation!r}")
        if self.weighted and interpolation != "inverted_cdf":
            raise ValueError(f"interpolation {interpolation!r} ranks equally weighted values; "
                             "a weighted sketch uses 'inverted_cdf'")
        if self.count == 0:
            raise ValueError("quantile of an empty sketch")
        qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
        if np.any((qs < 0.0) | (qs > 1.0)) or not np.all(np.isfinite(qs)):
            raise ValueError(f"quantile q must be within [0, 1], got {q}")
        if interpolation == "inverted_cdf":
            result = self._inverted_cdf(qs)
        else:
            pos = qs * (self.count - 1)
            lower = np.floor(pos).astype(np.int64)
            if interpolation == "lower":
                result = self._order_statistics(lower)
            else:
                upper = np.minimum(lower + 1, self.count - 1)
                lo_val = self._order_statistics(lower)
                hi_val = self._order_statistics(upper)
                result = lo_val + (pos - lower) * (hi_val - lo_val)
        return float(result[0]) if np.ndim(q) == 0 else result

    # -- serialisation ---------------------------------------------------------------------
    def guarantee(self) -> str:
        """The accuracy guarantee of quantile(), in words (also in to_dict())."""
        if self.weighted:
            return (f"quantile(q) within relative error {self.alpha} of the smallest sorted value whose cumulative "
                    "weight reaches q*weight (np.quantile(values, q, weights=w, method='inverted_cdf')); bucket "
                    f"weights are integer multiples of bucket_unit = 2^-{WEIGHT_UNIT_BITS}, each rounded by at most "
                    "half a unit when a weighted part is added, which can move the rank only at such ties")
        return (f"quantile(q) within relative error {self.alpha} of the sorted value of rank "
                "floor(q*(count-1)) (np.percentile method='lower')")

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-able form: moments plus sparse {bucket key: integer content} per sign."""
        def sparse(store: BucketStore) -> dict[str, int]:
            keys, counts = store.nonzero_items()
            return {str(int(k)): int(c) for k, c in zip(keys, counts)}

        return {
            "format": SKETCH_FORMAT,
            "version": SKETCH_FORMAT_VERSION,
            "alpha": self.alpha,
            "weighted": self.weighted,
            "guarantee": self.guarantee(),
            "count": self.count,
            "weight": self.weight,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "bucket_unit": self.bucket_unit,
            "zero_count": self.zero_count,
            "positive": sparse(self._positive),
            "negative": sparse(self._negative),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantileSketch:
        """Inverse of to_dict; ValueError (with the reason) on anything malformed."""
        if not isinstance(d, dict) or d.get("format") != SKETCH_FORMAT:
            raise ValueError("not a fedseg quantile sketch")
        if d.get("version") != SKETCH_FORMAT_VERSION:
            raise ValueError(f"sketch version {d.get('version')!r} is not supported (expected {SKETCH_FORMAT_VERSION})")
        weighted = d.get("weighted")
        if not isinstance(weighted, bool):
            raise ValueError("'weighted' must be true or false")
        # Every number is bounded before use (the sketch may come from another site): alpha
        # sets the key range, which sizes the dense bucket store; counts must fit int64 sums.
        alpha = finite_number(d["alpha"], "alpha")
        if not READ_ALPHA_RANGE[0] <= alpha <= READ_ALPHA_RANGE[1]:
            raise ValueError(f"alpha must be in [{READ_ALPHA_RANGE[0]}, {READ_ALPHA_RANGE[1]}], not {alpha}")
        sketch = cls(alpha, weighted=weighted)
        if d.get("bucket_unit") != sketch.bucket_unit:
            raise ValueError(f"bucket_unit must be {sketch.bucket_unit} for a {'' if weighted else 'un'}weighted sketch")
        sketch.count = nonnegative_int(d["count"], "count")
        sketch.sum = finite_number(d["sum"], "sum")
        sketch.sumsq = finite_number(d["sumsq"], "sumsq")
        sketch.zero_count = nonnegative_int(d["zero_count"], "zero_count")
        weight = finite_number(d["weight"], "weight")
        if weighted:
            sketch._weight = weight
        elif weight != sketch.count:
            raise ValueError("weight of an unweighted sketch must equal its count")
        if sketch.count:
            sketch.min, sketch.max = finite_number(d["min"], "min"), finite_number(d["max"], "max")
            if not sketch.min <= sketch.max:
                raise ValueError("min is larger than max")
        # the keys a float64 can reach: |ln x| <= 745 for every finite nonzero double
        key_limit = math.ceil(745.0 / sketch._log_gamma) + 1
        contents = sketch.zero_count
        for store, items in ((sketch._positive, d["positive"]), (sketch._negative, d["negative"])):
            if not isinstance(items, dict):
                raise ValueError("bucket contents must be an object")
            if items:
                keys = [bucket_key(k, key_limit) for k in items]
                values = [nonnegative_int(c, "bucket content") for c in items.values()]
                contents += sum(values)   # Python ints: no wrap-around before the check
                if contents > MAX_CONTENTS:
                    raise ValueError(f"bucket contents add up to more than {MAX_CONTENTS}")
                add_sparse(store, np.array(keys, dtype=np.int64), np.array(values, dtype=np.int64))
        if not weighted and contents != sketch.count:
            raise ValueError("bucket counts do not add up to count")
        # Weighted: rounding to the 2**-30 grid moves a part's total by far less than 1e-4.
        if weighted and (weight < 0 or (sketch.count == 0) != (weight == 0)
                         or abs(contents * WEIGHT_UNIT - weight) > 1e-4 * weight):
            raise ValueError("bucket weights do not add up to weight")
        return sketch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        kind = ", weighted" if self.weighted else ""
        return f"QuantileSketch(alpha={self.alpha}{kind}, count={self.count}, min={self.min}, max={self.max})"

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

Guarantee (stated in `to_dict()["guarantee"]`): for 0 <= q <= 1 and n values,
``quantile(q)`` returns v with |v - x_(r)| <= alpha * |x_(r)|, where x_(r) is the sorted
value of 0-based rank r = floor(q * (n - 1)) — exactly ``np.percentile(values, 100 * q,
method="lower")``. This is DDSketch's interpolation-free rank rule.

nnU-Net computes its percentiles with ``np.percentile``'s default *linear* interpolation,
p = x_(r) + f * (x_(r+1) - x_(r)) with f = q * (n - 1) - r. ``quantile(q,
interpolation="linear")`` estimates both neighbours and interpolates the same way, so it is
within alpha * max(|x_(r)|, |x_(r+1)|) of p (within relative error alpha of p whenever the
two neighbours share a sign, i.e. everywhere except across a sign change). The merged
fingerprint uses the linear form to match nnU-Net's definition.

Alongside the buckets the sketch keeps exact count, sum and sum of squares (float64) and
exact min and max, so mean and standard deviation of a merged sketch are exact to float
precision; quantile estimates are clamped to [min, max] and the extreme ranks return the
exact min / max.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SKETCH_FORMAT = "fedseg.ddsketch"
SKETCH_FORMAT_VERSION = 1
# 0.5 % relative error: far below the spread of intensity percentiles across scanners, and
# it keeps a channel's sketch to a few thousand buckets for any realistic intensity range.
DEFAULT_ALPHA = 0.005
# Values are bucketed in chunks of this many: the float64 work buffers (0.5 MiB each) stay in
# cache and are reused, instead of page-faulting in whole-array temporaries.
_CHUNK = 1 << 16


class _Store:
    """Dense bucket counts for keys offset .. offset + len(counts) - 1 (int64 counts)."""

    __slots__ = ("offset", "counts")

    def __init__(self) -> None:
        self.offset = 0
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _extend(self, lo: int, hi: int) -> None:
        if self.counts.size == 0:
            self.offset = lo
            self.counts = np.zeros(hi - lo + 1, dtype=np.int64)
            return
        cur_lo, cur_hi = self.offset, self.offset + self.counts.size - 1
        new_lo, new_hi = min(lo, cur_lo), max(hi, cur_hi)
        if (new_lo, new_hi) == (cur_lo, cur_hi):
            return
        grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        grown[cur_lo - new_lo: cur_lo - new_lo + self.counts.size] = self.counts
        self.offset, self.counts = new_lo, grown

    def add_keys(self, keys: np.ndarray) -> None:
        if keys.size == 0:
            return
        lo, hi = int(keys.min()), int(keys.max())
        self._extend(lo, hi)
        self.counts += np.bincount(keys - self.offset, minlength=self.counts.size)

    def add_counts(self, lo: int, counts: np.ndarray) -> None:
        if counts.size == 0:
            return
        self._extend(lo, lo + counts.size - 1)
        start = lo - self.offset
        self.counts[start: start + counts.size] += counts

    def nonzero_items(self) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(self.counts)
        return idx + self.offset, self.counts[idx]


class QuantileSketch:
    """Mergeable summary of a multiset of real numbers: exact moments + quantile buckets.

    >>> sketch = QuantileSketch().add(np.arange(1, 1001))
    >>> round(sketch.quantile(0.5))    # the 500th value, within 0.5 %
    500
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), not {alpha}")
        self.alpha = float(alpha)
        self._gamma = (1.0 + self.alpha) / (1.0 - self.alpha)
        self._log_gamma = math.log(self._gamma)
        self.count = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.zero_count = 0
        self._positive = _Store()
        self._negative = _Store()   # keyed by |x|

    # -- adding ----------------------------------------------------------------------------
    def add(self, values: Any) -> QuantileSketch:
        """Add every value of an array (any shape, any real dtype). Returns self.

        Vectorised and streamed in cache-sized chunks with reused buffers (allocating
        whole-array temporaries costs more than the arithmetic): 1e7 values take well
        under a second.
        """
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
            self._add_chunk(chunk, m, k, inv_log_gamma, all_positive=vmin > 0.0)
        self.count += int(v.size)
        self.sum += total
        self.sumsq += total_sq
        self.min = min(self.min, vmin)
        self.max = max(self.max, vmax)
        return self

    def _add_chunk(self, chunk: np.ndarray, m: np.ndarray, k: np.ndarray, inv_log_gamma: float,
                   all_positive: bool) -> None:
        """Bucket one chunk; `m` holds the chunk as float64 and is overwritten."""
        negative = None
        n_zero = 0
        if not all_positive:
            negative = chunk < 0
            np.abs(m, out=m)
            zero = m == 0.0
            n_zero = int(np.count_nonzero(zero))
            if n_zero:
                # log(0) is -inf: park zeros at 1.0 (key 0) and take them out of that bucket below.
                m[zero] = 1.0
        np.log(m, out=m)
        m *= inv_log_gamma
        np.ceil(m, out=m)
        np.copyto(k, m, casting="unsafe")
        if all_positive:
            self._positive.add_keys(k)
            return
        kmin, kmax = int(k.min()), int(k.max())
        width = kmax - kmin + 1
        k -= kmin
        k[negative] += width          # one bincount for both signs: negatives in the upper half
        counts = np.bincount(k, minlength=2 * width)
        positive_counts, negative_counts = counts[:width], counts[width:]
        if n_zero:
            positive_counts[-kmin] -= n_zero
            self.zero_count += n_zero
        _add_trimmed(self._positive, kmin, positive_counts)
        _add_trimmed(self._negative, kmin, negative_counts)

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Add `other`'s contents to this sketch (exact: bucket counts add). Returns self."""
        if not math.isclose(self.alpha, other.alpha, rel_tol=0.0, abs_tol=1e-15):
            raise ValueError(f"cannot merge sketches of different accuracy ({self.alpha} vs {other.alpha})")
        if other.count == 0:
            return self
        self._positive.add_counts(other._positive.offset, other._positive.counts)
        self._negative.add_counts(other._negative.offset, other._negative.counts)
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def copy(self) -> QuantileSketch:
        return QuantileSketch.from_dict(self.to_dict())

    # -- moments ---------------------------------------------------------------------------
    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    @property
    def variance(self) -> float:
        """Population variance (as np.var / np.std with ddof=0, which nnU-Net uses)."""
        if not self.count:
            return math.nan
        mean = self.mean
        return max(self.sumsq / self.count - mean * mean, 0.0)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    # -- quantiles -------------------------------------------------------------------------
    def _ordered_buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """(cumulative counts, representative values) of all buckets in ascending value order."""
        neg_keys, neg_counts = self._negative.nonzero_items()
        pos_keys, pos_counts = self._positive.nonzero_items()
        neg_keys, neg_counts = neg_keys[::-1], neg_counts[::-1]   # most negative first
        counts = np.concatenate([neg_counts, [self.zero_count], pos_counts]).astype(np.int64)
        values = np.concatenate([-self._representative(neg_keys), [0.0], self._representative(pos_keys)])
        return np.cumsum(counts), values

    def _representative(self, keys: np.ndarray) -> np.ndarray:
        return 2.0 * np.exp(keys.astype(np.float64) * self._log_gamma) / (self._gamma + 1.0)

    def _order_statistics(self, ranks: np.ndarray) -> np.ndarray:
        """Estimates of the sorted values of the given 0-based integer ranks."""
        cumulative, values = self._ordered_buckets()
        idx = np.searchsorted(cumulative, ranks, side="right")
        est = values[np.minimum(idx, values.size - 1)]
        est = np.clip(est, self.min, self.max)
        est = np.where(ranks == 0, self.min, est)                 # the extremes are known exactly
        return np.where(ranks == self.count - 1, self.max, est)

    def quantile(self, q: float | np.ndarray, interpolation: str = "lower") -> float | np.ndarray:
        """Estimate the q-quantile (0 <= q <= 1); an array of q gives an array.

        interpolation="lower" (DDSketch's rule): within relative error alpha of
        np.percentile(values, 100*q, method="lower"). interpolation="linear": numpy's default
        (and nnU-Net's) definition, see the module docstring for its bound.
        """
        if self.count == 0:
            raise ValueError("quantile of an empty sketch")
        qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
        if np.any((qs < 0.0) | (qs > 1.0)) or not np.all(np.isfinite(qs)):
            raise ValueError(f"quantile q must be within [0, 1], got {q}")
        pos = qs * (self.count - 1)
        lower = np.floor(pos).astype(np.int64)
        if interpolation == "lower":
            result = self._order_statistics(lower)
        elif interpolation == "linear":
            upper = np.minimum(lower + 1, self.count - 1)
            lo_val = self._order_statistics(lower)
            hi_val = self._order_statistics(upper)
            result = lo_val + (pos - lower) * (hi_val - lo_val)
        else:
            raise ValueError(f"interpolation must be 'lower' or 'linear', not {interpolation!r}")
        return float(result[0]) if np.ndim(q) == 0 else result

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-able form: moments plus sparse {bucket key: count} per sign."""
        def sparse(store: _Store) -> dict[str, int]:
            keys, counts = store.nonzero_items()
            return {str(int(k)): int(c) for k, c in zip(keys, counts)}

        return {
            "format": SKETCH_FORMAT,
            "version": SKETCH_FORMAT_VERSION,
            "alpha": self.alpha,
            "guarantee": (
                f"quantile(q) within relative error {self.alpha} of the sorted value of rank "
                "floor(q*(count-1)) (np.percentile method='lower')"
            ),
            "count": self.count,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
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
            raise ValueError(f"sketch version {d.get('version')!r} is not supported")
        sketch = cls(float(d["alpha"]))
        sketch.count = int(d["count"])
        sketch.sum = float(d["sum"])
        sketch.sumsq = float(d["sumsq"])
        sketch.zero_count = int(d["zero_count"])
        if sketch.count:
            sketch.min, sketch.max = float(d["min"]), float(d["max"])
        for store, items in ((sketch._positive, d["positive"]), (sketch._negative, d["negative"])):
            if items:
                keys = np.array([int(k) for k in items], dtype=np.int64)
                counts = np.array([int(c) for c in items.values()], dtype=np.int64)
                if np.any(counts < 0):
                    raise ValueError("negative bucket count")
                _add_sparse(store, keys, counts)
        if sketch._positive.total + sketch._negative.total + sketch.zero_count != sketch.count:
            raise ValueError("bucket counts do not add up to count")
        return sketch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"QuantileSketch(alpha={self.alpha}, count={self.count}, min={self.min}, max={self.max})"


def _add_trimmed(store: _Store, lo: int, counts: np.ndarray) -> None:
    """Add dense counts starting at key `lo`, without growing the store for empty edges."""
    nonzero = np.flatnonzero(counts)
    if nonzero.size:
        store.add_counts(lo + int(nonzero[0]), counts[nonzero[0]: nonzero[-1] + 1])


def _add_sparse(store: _Store, keys: np.ndarray, counts: np.ndarray) -> None:
    lo, hi = int(keys.min()), int(keys.max())
    dense = np.zeros(hi - lo + 1, dtype=np.int64)
    np.add.at(dense, keys - lo, counts)
    store.add_counts(lo, dense)

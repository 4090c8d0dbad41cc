"""The integer bucket contents of a quantile sketch (fedseg.planning.sketch) and how values reach them.

A bucket's content is an integer: a count, or a weight in units of 2**-30 for weighted
sketches, so adding contents is exact and independent of the order. Values are bucketed by
key k = ceil(log_gamma(|x|)); positive and negative values go to separate stores.
"""

from __future__ import annotations

import numpy as np


class BucketStore:
    """Dense integer bucket contents for keys offset .. offset + len(counts) - 1 (int64)."""

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


def bucket_chunk(positive: BucketStore, negative: BucketStore, chunk: np.ndarray, m: np.ndarray, k: np.ndarray,
                 inv_log_gamma: float, all_positive: bool) -> int:
    """Bucket one chunk of values into the two stores; returns how many of them are exact zeros.

    `m` holds the chunk as float64 and is overwritten; `k` is the chunk-sized int64 key buffer.
    """
    is_negative = None
    n_zero = 0
    if not all_positive:
        is_negative = chunk < 0
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
        positive.add_keys(k)
        return 0
    kmin, kmax = int(k.min()), int(k.max())
    width = kmax - kmin + 1
    k -= kmin
    k[is_negative] += width          # one bincount for both signs: negatives in the upper half
    counts = np.bincount(k, minlength=2 * width)
    positive_counts, negative_counts = counts[:width], counts[width:]
    if n_zero:
        positive_counts[-kmin] -= n_zero
    add_trimmed(positive, kmin, positive_counts)
    add_trimmed(negative, kmin, negative_counts)
    return n_zero


def scaled(counts: np.ndarray, factor: float) -> np.ndarray:
    """Integer bucket contents times `factor`, rounded to the nearest integer (exact when factor is 1)."""
    if factor == 1.0:
        return counts
    return np.rint(counts * factor).astype(np.int64)


def add_trimmed(store: BucketStore, lo: int, counts: np.ndarray) -> None:
    """Add dense counts starting at key `lo`, without growing the store for empty edges."""
    nonzero = np.flatnonzero(counts)
    if nonzero.size:
        store.add_counts(lo + int(nonzero[0]), counts[nonzero[0]: nonzero[-1] + 1])


def add_sparse(store: BucketStore, keys: np.ndarray, counts: np.ndarray) -> None:
    """Add contents given as (key, content) pairs, as read from a sketch's JSON form."""
    lo, hi = int(keys.min()), int(keys.max())
    dense = np.zeros(hi - lo + 1, dtype=np.int64)
    np.add.at(dense, keys - lo, counts)
    store.add_counts(lo, dense)

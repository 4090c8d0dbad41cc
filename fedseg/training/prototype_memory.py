"""MDM-MixMFL's modality memory as plain arrays: layout, FIFO merge and k-means (numpy only).

One memory per MRI sequence (and network stage), a fixed-shape float32 array
(capacity, 4 + 2·D) so it travels in the weight files like any tensor (the engine checks
shapes against the plan's manifest). Row:

    [round, site number, slot, key source, key (D), value (D)]

- value: the sequence's modality-tailored representation (what retrieval returns);
- key:   a representation taken at the same voxels, in the space named by key source:
         SHARED_KEY (0) = the modality-shared representation, 1 + q = the tailored
         representation of sequence q (another sequence the writing site holds). A site that
         lacks the sequence queries each key space it can produce (its shared representation,
         and the tailored representation of each sequence it holds): a T2+FLAIR site asks the
         T1ce memory through the prototypes a T1ce+T2 site keyed by its T2 features;
- (round, site number, slot) identify a prototype: round >= 1 for a filled row, 0 for an
  empty one; site number is the 1-based index of the site in the plan's sorted site names.

FIFO: rows are kept sorted oldest first by identity (round, then site, then slot); merging
takes the union of the filled rows of all inputs (a row several sites send back unchanged
counts once), sorts it and keeps the newest `capacity`. The result is the same whatever the
order of the inputs, so the coordinator's merge is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedseg.training.recipes.params import MEMORY_QUERIES  # re-exported: the choices of `memory_query`

IDENTITY_COLUMNS = 3      # round, site number, slot: identify a prototype
KEY_SOURCE_COLUMN = 3     # which representation the key is in
META_COLUMNS = 4
SHARED_KEY = 0            # key source of keys in the modality-shared space; 1 + q: tailored of sequence q
# MEMORY_QUERIES (imported above): which of a site's representations query a missing
# sequence's memory ("tailored", "shared" or "both"); a parameter's choices, so it lives
# with the recipe's parameters.


def memory_width(dim: int) -> int:
    return META_COLUMNS + 2 * int(dim)


def tailored_key(sequence_index: int) -> int:
    """The key source of keys in the tailored space of sequence `sequence_index`."""
    return 1 + int(sequence_index)


def feature_dim(memory: np.ndarray) -> int:
    width = memory.shape[-1] - META_COLUMNS
    if width <= 0 or width % 2:
        raise ValueError(f"a memory row holds {META_COLUMNS} + 2·D values, got width {memory.shape[-1]}")
    return width // 2


def empty_memory(capacity: int, dim: int) -> np.ndarray:
    return np.zeros((int(capacity), memory_width(dim)), dtype=np.float32)


def filled_rows(memory: np.ndarray) -> np.ndarray:
    """The rows that hold a prototype (round >= 1)."""
    memory = np.asarray(memory)
    return memory[memory[:, 0] >= 1]


def fifo_merge(memories: Sequence[np.ndarray], capacity: int | None = None) -> np.ndarray:
    """Union of the filled rows (deduplicated by identity), oldest first, newest `capacity` kept.

    Empty rows pad the end. `capacity` defaults to the first input's number of rows. The
    result is float64 (the engine casts it back to the manifest's dtype).
    """
    if not memories:
        raise ValueError("nothing to merge")
    width = memories[0].shape[-1]
    capacity = memories[0].shape[0] if capacity is None else int(capacity)
    rows = [filled_rows(np.asarray(m, dtype=np.float64)) for m in memories]
    if any(r.shape[-1] != width for r in rows):
        raise ValueError("memories to merge differ in row width")
    out = np.zeros((capacity, width), dtype=np.float64)
    stacked = np.concatenate(rows, axis=0) if rows else np.zeros((0, width))
    if not len(stacked):
        return out
    identity = stacked[:, :IDENTITY_COLUMNS]
    # np.unique sorts lexicographically by (round, site, slot): the FIFO order; return_index
    # keeps the first copy of a duplicated identity (the same prototype sent back by many sites).
    _, first = np.unique(identity, axis=0, return_index=True)
    ordered = stacked[first]
    ordered = ordered[np.lexsort(ordered[:, :IDENTITY_COLUMNS].T[::-1])]
    kept = ordered[-capacity:] if capacity > 0 else ordered[:0]
    out[: len(kept)] = kept
    return out


def prototype_rows(
    keys: np.ndarray, values: np.ndarray, round_index: int, site_number: int, key_source: int = SHARED_KEY, first_slot: int = 0
) -> np.ndarray:
    """New memory rows for k prototypes (keys, values: (k, D)) made at `round_index` by a site,
    keys in the space `key_source`, slots numbered from `first_slot` (a site writing several
    batches in one round numbers them on, so every prototype keeps its own identity)."""
    keys, values = np.asarray(keys, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if keys.shape != values.shape or keys.ndim != 2:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must both be (k, D)")
    if round_index < 1 or site_number < 1:
        raise ValueError("round and site number start at 1 (0 marks an empty row)")
    if key_source < 0 or first_slot < 0:
        raise ValueError("key source and slot are >= 0")
    k = keys.shape[0]
    meta = np.stack([np.full(k, float(round_index)), np.full(k, float(site_number)),
                     first_slot + np.arange(k, dtype=np.float64), np.full(k, float(key_source))], axis=1)
    return np.concatenate([meta, keys, values], axis=1)


def push(memory: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`memory` with `rows` appended FIFO (same shape and dtype as `memory`)."""
    return fifo_merge([memory, rows], capacity=memory.shape[0]).astype(memory.dtype)


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 25) -> np.ndarray:
    """Cluster labels of `points` (n, d) into at most k clusters (k-means++ seeding, Lloyd steps)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, min(int(k), n))
    centres = np.empty((k, points.shape[1]))
    centres[0] = points[rng.integers(n)]
    dist = ((points - centres[0]) ** 2).sum(1)
    for c in range(1, k):
        total = dist.sum()
        idx = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        centres[c] = points[idx]
        dist = np.minimum(dist, ((points - centres[c]) ** 2).sum(1))
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        d = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        new = d.argmin(1)
        if _ > 0 and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = points[labels == c]
            if len(members):
                centres[c] = members.mean(0)
    return labels

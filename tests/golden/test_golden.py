"""The same tiny round of every strategy writes the same tensors as recorded in tests/golden/tensors.json.

A refactoring must not change a single bit of what a round writes, so the comparison is exact:
the sha256 of every tensor's bytes, with its shape and dtype. That is possible because the runs
are bit-identical from run to run on one torch thread (golden_runs.golden_digests pins it;
checked when the record was made, under OMP_NUM_THREADS=1 and =2). With more threads about half
the trained tensors change in their last bits, which is why the thread count is pinned rather
than compared with a tolerance: a tolerance loose enough for that noise (~3e-4 of a tensor's
norm on biases whose gradient is rounding noise) would also let a small real change through.
The recorded statistics (sum, norm, projection) only explain a failure: a deviation of 1e-7 of
the norm is float reordering (another CPU or BLAS: re-record there first, on the commit before
the change), one of 1e-3 or more is a change in the numbers.

After an intended numeric change, re-record with `PYTHONPATH=$PWD python scripts/record_golden.py`
and name the change, and why, in the commit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from golden_runs import RUNS, golden_digests, load_golden  # noqa: E402


@pytest.fixture(scope="module")
def digests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return golden_digests(tmp_path_factory.mktemp("golden"))


def deviation(recorded: dict, found: dict) -> float:
    """Largest change of the statistics, relative to the tensor's norm plus 1e-6 per element."""
    if "stats" not in recorded or "stats" not in found:
        return math.inf
    scale = recorded["stats"][1] + 1e-6 * math.sqrt(math.prod(recorded["shape"]) or 1)
    return max(abs(a - b) for a, b in zip(recorded["stats"], found["stats"])) / scale


@pytest.mark.parametrize("strategy", [run.strategy for run in RUNS])
def test_round_writes_the_recorded_tensors(digests: dict[str, dict], strategy: str) -> None:
    recorded, found = load_golden()[strategy], digests[strategy]
    assert sorted(found) == sorted(recorded), "the run writes other weight files than recorded"
    changed = {}
    for file, tensors in recorded.items():
        assert sorted(found[file]) == sorted(tensors), f"{file} holds other tensors than recorded"
        for name, digest in tensors.items():
            now = found[file][name]
            assert (now["shape"], now["dtype"]) == (digest["shape"], digest["dtype"]), f"{file}:{name}"
            if now["sha256"] != digest["sha256"]:
                changed[f"{file}:{name}"] = deviation(digest, now)
    worst = sorted(changed.items(), key=lambda item: -item[1])[:3]
    assert not changed, (f"{len(changed)} tensor(s) differ from the record; largest relative changes: "
                         + ", ".join(f"{name} {value:.1e}" for name, value in worst))


def test_record_covers_every_strategy() -> None:
    from fedseg.federation.strategies import strategy_names

    record = load_golden()
    assert sorted(record) == sorted(strategy_names())
    for strategy, files in record.items():
        assert {Path(file).parts[0] for file in files} == {"round_000", "round_001"}, strategy

"""The data pass (content hash, finite values, norm) running while the engine merges.

The engine merges from files whose data pass has not finished: what a user relies on is
that a bad file still fails the whole aggregation, names the first bad file in the order
given, and leaves nothing written, whatever the pass met first.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from test_federation_engine import _rewrite, make_plans, write_updates

from fedseg.errors import InputError
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.validation import start_validation, validate_updates

FIRST_NAME = "decoder.seg_layers.0.weight"     # first float tensor by name
LAST_NAME = "encoder.stages.0.conv.weight"     # last float tensor by name


def _set_first(name: str, value: float):
    def mutate(tensors, _meta):
        tensors[name] = tensors[name].copy()
        tensors[name].reshape(-1)[0] = value
    return mutate


def _nan_in(name: str):
    return _set_first(name, np.nan)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("order", [("A", "B", "C"), ("B", "A", "C")])
def test_first_bad_file_in_the_order_given(tmp_path: Path, order: tuple[str, ...]) -> None:
    """A's fault is in its last tensor, B's in its first: the pass, tensor by tensor across the
    files, meets B's first; the file reported is still the first bad one in the order given."""
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    _rewrite(paths["A"], _nan_in(LAST_NAME))
    _rewrite(paths["B"], _nan_in(FIRST_NAME))
    out = tmp_path / "round_001"
    for workers in (1, 2):
        with pytest.raises(InputError) as info:
            start_validation(plans, [paths[s] for s in order], workers=workers).wait()
        assert str(paths[order[0]]) in str(info.value) and "non-finite" in str(info.value)
    with pytest.raises(InputError) as info:
        aggregate_round(plans, [paths[s] for s in order], out)
    assert str(paths[order[0]]) in str(info.value) and "non-finite" in str(info.value)
    assert not out.exists()


def test_one_pass_thread_or_one_per_file_agree(tmp_path: Path) -> None:
    plans = make_plans()
    paths = list(write_updates(plans, tmp_path).values())
    together = start_validation(plans, paths, workers=1).wait()
    per_file = validate_updates(plans, paths, workers=3)
    assert [u.update_norm for u in together] == [u.update_norm for u in per_file]
    assert all(np.isfinite(u.update_norm) and u.update_norm > 0 for u in together)


def test_corrupt_file_is_refused_over_a_round_made_from_its_claimed_hash(tmp_path: Path) -> None:
    """The folder holds the round made from these files; one file's bytes change under the same
    claimed content hash: a re-run refuses it instead of answering "nothing to do"."""
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    out = tmp_path / "round_001"
    aggregate_round(plans, list(paths.values()), out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _flip_last_byte(paths["C"])
    with pytest.raises(InputError) as info:
        aggregate_round(plans, list(paths.values()), out)
    assert str(paths["C"]) in str(info.value) and "content hash mismatch" in str(info.value)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_file_is_reported_over_a_later_fault(tmp_path: Path) -> None:
    """A corrupt file and a fault found while merging (the previous round clip_norm needs is
    missing): the corrupt file is what is reported, and nothing is written."""
    plans = make_plans(params={"clip_norm": 1.0})
    paths = write_updates(plans, tmp_path)
    _flip_last_byte(paths["B"])
    out = tmp_path / "round_001"
    with pytest.raises(InputError) as info:
        aggregate_round(plans, list(paths.values()), out)
    assert str(paths["B"]) in str(info.value) and "content hash mismatch" in str(info.value)
    assert not out.exists()


def test_refused_round_shows_no_numpy_warning_from_the_merge(tmp_path: Path) -> None:
    """+inf in one file and -inf in another at the same element: merging them before the pass
    refused them makes inf − inf; the user sees the refusal alone, no RuntimeWarning."""
    plans = make_plans()
    paths = write_updates(plans, tmp_path)
    _rewrite(paths["A"], _set_first(LAST_NAME, np.inf))
    _rewrite(paths["B"], _set_first(LAST_NAME, -np.inf))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="non-finite"):
            aggregate_round(plans, list(paths.values()), tmp_path / "round_001")
    assert [str(w.message) for w in shown] == []

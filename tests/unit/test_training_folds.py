"""Cross-validation folds: nnU-Net's splits_final.json layout, seeded, every case validated once."""

from __future__ import annotations

import json

import pytest

from fedseg.errors import InputError
from fedseg.training.folds import FOLD_ALL, SPLITS_FILE, fold_cases, load_or_create_splits, make_splits, parse_fold

CASES = [f"case_{i:03d}" for i in range(8)]


def test_five_folds_validate_every_case_exactly_once() -> None:
    splits = make_splits(CASES, 5, seed=1234, site="site_a")
    assert len(splits) == 5
    validated = [case for fold in splits for case in fold["val"]]
    assert sorted(validated) == CASES
    assert sorted(len(f["val"]) for f in splits) == [1, 1, 2, 2, 2]
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == CASES


def test_splits_are_seeded_by_plan_seed_and_site() -> None:
    same = make_splits(list(reversed(CASES)), 5, seed=1234, site="site_a")
    assert same == make_splits(CASES, 5, seed=1234, site="site_a")
    assert make_splits(CASES, 5, seed=1234, site="site_b") != same
    assert make_splits(CASES, 5, seed=7, site="site_a") != same


def test_splits_file_is_written_once_and_an_edited_one_is_used(tmp_path) -> None:
    splits = load_or_create_splits(tmp_path, CASES, 5, 0, "s")
    assert json.loads((tmp_path / SPLITS_FILE).read_text()) == splits
    custom = [{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:6], "val": CASES[6:]}]
    (tmp_path / SPLITS_FILE).write_text(json.dumps(custom))
    assert load_or_create_splits(tmp_path, CASES, 5, 0, "s") == custom
    assert fold_cases(custom, 1, CASES) == (CASES[:6], CASES[6:])
    assert fold_cases(custom, FOLD_ALL, CASES) == (CASES, CASES)


def test_bad_splits_and_folds_are_input_errors(tmp_path) -> None:
    (tmp_path / SPLITS_FILE).write_text(json.dumps([{"train": ["nope"], "val": []}]))
    with pytest.raises(InputError, match="nope"):
        load_or_create_splits(tmp_path, CASES, 5, 0, "s")
    small = make_splits(CASES[:3], 5, 0, "s")   # fewer cases than folds: the last folds validate on none
    assert [len(f["val"]) for f in small] == [1, 1, 1, 0, 0] and small[4]["train"] == CASES[:3]
    assert make_splits(CASES[:1], 5, 0, "s") == [{"train": CASES[:1], "val": []}] * 5
    assert parse_fold("all") == FOLD_ALL and parse_fold("3", 5) == 3
    with pytest.raises(InputError, match="fold 5 does not exist"):
        parse_fold("5", 5)
    with pytest.raises(InputError, match="integer or 'all'"):
        parse_fold("x")

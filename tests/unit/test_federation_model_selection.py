"""Coordinator-side model selection: best round, checkpoints, find-best from sites' numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.atomic import write_json_atomic
from fedseg.errors import InputError
from fedseg.federation.best_round import read_best, update_best, validation_summary
from fedseg.federation.checkpoints import checkpoint_folder
from fedseg.federation.model_selection import find_best
from fedseg.federation.site_validation import VALIDATION_FORMAT, candidate_names


def _extra(dice, n, fold=0):
    return {"incoming_val_dice": dice, "n_val_cases": n, "fold": fold, "val_dice": 0.99}


def test_validation_summary_is_case_weighted() -> None:
    summary = validation_summary(3, {"a": _extra(0.5, 1), "b": _extra(0.8, 3), "c": _extra(None, 0)})
    assert summary["scored_round"] == 2 and summary["n_cases"] == 4
    assert summary["mean_dice"] == pytest.approx((0.5 + 3 * 0.8) / 4)
    assert sorted(summary["per_site"]) == ["a", "b"] and summary["fold"] == "0"
    assert validation_summary(1, {"a": {"val_dice": 0.3}}) is None


def test_updates_of_different_folds_are_refused() -> None:
    with pytest.raises(InputError, match="different cross-validation folds"):
        validation_summary(2, {"a": _extra(0.5, 1, fold=0), "b": _extra(0.5, 1, fold=1)}, [Path("a.st"), Path("b.st")])


def _round(run: Path, r: int, marker: str) -> None:
    folder = run / f"round_{r:03d}"
    (folder / "models").mkdir(parents=True)
    (folder / "updates").mkdir()
    (folder / "site_a.safetensors").write_text(marker)
    (folder / "models" / "global.safetensors").write_text(marker)
    (folder / "updates" / "site_a.safetensors").write_text("update")
    (folder / "aggregate.json").write_text("{}")


def test_best_keeps_the_highest_scoring_round_and_checkpoints_resolve(tmp_path: Path) -> None:
    (tmp_path / "plans.json").write_text("{}")
    for r in range(4):
        _round(tmp_path, r, f"r{r}")
    assert update_best(tmp_path, validation_summary(2, {"a": _extra(0.6, 2)}))
    assert not update_best(tmp_path, validation_summary(3, {"a": _extra(0.4, 2)}))   # round 2 scored lower
    assert (tmp_path / "best" / "site_a.safetensors").read_text() == "r1"
    assert update_best(tmp_path, validation_summary(4, {"a": _extra(0.7, 2)}))
    best = tmp_path / "best"
    assert (best / "site_a.safetensors").read_text() == "r3" and (best / "models" / "global.safetensors").is_file()
    assert not (best / "updates").exists() and read_best(tmp_path)["round"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no staging left
    assert checkpoint_folder(tmp_path, "final") == tmp_path / "round_003"
    assert checkpoint_folder(tmp_path, "best") == best
    assert checkpoint_folder(tmp_path, "round_1") == tmp_path / "round_001"
    with pytest.raises(InputError, match="final, best or round_N"):
        checkpoint_folder(tmp_path, "latest")


def _runs(tmp_path: Path) -> list[Path]:
    from fedseg.planning.plans import load_plans

    roots = []
    for name in ("3d_fullres", "2d"):
        root = tmp_path / name / "fold_0"
        root.mkdir(parents=True)
        plans = _plans(name)
        plans.save(root / "plans.json")
        assert load_plans(root / "plans.json").default_configuration == name
        roots.append(root.parent)
    return roots


def _plans(configuration: str):
    from tests.unit.test_training_trainer import tiny_plans

    plans = tiny_plans()
    config = plans.configurations.pop("3d_fullres")
    config.name = configuration
    plans.configurations[configuration] = config
    plans.default_configuration = configuration
    return plans


def _site_file(path: Path, site: str, runs, scores: dict[str, tuple[float, int]]) -> Path:
    """A site's validation file whose every candidate has Dice sum/count `scores[name]`."""
    from fedseg.planning.plans import load_plans

    ids = {load_plans(r / "fold_0" / "plans.json").default_configuration: load_plans(r / "fold_0" / "plans.json").plan_id for r in runs}
    candidates = {}
    for name, parts in candidate_names(ids).items():
        total, count = scores[name]
        variants = {"none": [total, count], "none+label": [total, count], "foreground": [total * 0.9, count],
                    "foreground+label": [total * 0.9, count]}
        candidates[name] = {"members": parts, "n_cases": count, "dice_sums": {"lesion": variants}}
    write_json_atomic(path, {"format": VALIDATION_FORMAT, "site": site, "checkpoint": "final", "folds": ["0"],
                             "labels": {"background": 0, "lesion": 1}, "configurations": ids, "candidates": candidates})
    return path


def test_find_best_weighs_every_case_equally(tmp_path: Path) -> None:
    """Site a (1 case) prefers 2d, site b (4 cases) prefers 3d_fullres: the mean of the two
    sites' means would pick 2d, the case-weighted mean picks 3d_fullres."""
    runs = _runs(tmp_path)
    a = _site_file(tmp_path / "a.json", "site_a", runs, {"2d": (1.0, 1), "3d_fullres": (0.2, 1), "2d+3d_fullres": (0.5, 1)})
    b = _site_file(tmp_path / "b.json", "site_b", runs, {"2d": (2.0, 4), "3d_fullres": (3.2, 4), "2d+3d_fullres": (2.8, 4)})
    plan = find_best(runs, [a, b], tmp_path / "selection")
    assert plan["chosen"] == "3d_fullres"
    assert plan["candidates"]["3d_fullres"]["foreground_mean_dice"] == pytest.approx(3.4 / 5)
    assert plan["candidates"]["2d"]["foreground_mean_dice"] == pytest.approx(3.0 / 5)
    assert plan["candidates"]["2d+3d_fullres"]["foreground_mean_dice"] == pytest.approx(3.3 / 5)
    assert plan["postprocessing"] == {"largest_foreground": False, "largest_per_label": []}
    assert [m["run"] for m in plan["models"]] == ["../3d_fullres/fold_0"]
    with pytest.raises(InputError, match="second validation file"):
        find_best(runs, [a, a], tmp_path / "selection")
    json.dumps(plan, allow_nan=False)


def test_cli_refuses_bad_model_selection_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One-line errors naming the fault, exit code 2, nothing written."""
    from fedseg.cli.main import run

    images = tmp_path / "images"
    images.mkdir()
    assert run(["predict", "-i", str(images), "-o", str(tmp_path / "out")]) == 2
    assert "give the models one way" in capsys.readouterr().err
    runs = _runs(tmp_path)
    bad = tmp_path / "site_a.json"
    bad.write_text('{"format": "something else"}')
    assert run(["find-best", *map(str, runs), "-m", str(bad), "-o", str(tmp_path / "sel")]) == 2
    err = capsys.readouterr().err
    assert "not a fedseg validation file" in err and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "sel").exists()
    assert run(["predict", "--run", str(runs[0] / "fold_0"), "--checkpoint", "best", "-i", str(images), "-o", str(tmp_path / "o")]) == 2
    assert "has no best/ folder yet" in capsys.readouterr().err


def test_cli_state_template_default_is_the_library_default() -> None:
    from fedseg.cli.selection_commands import STATE_TEMPLATE
    from fedseg.federation.site_validation import DEFAULT_STATE_TEMPLATE

    assert STATE_TEMPLATE == DEFAULT_STATE_TEMPLATE

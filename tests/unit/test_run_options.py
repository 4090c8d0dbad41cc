"""What a new user tripped on in `simulate`: option precedence, skipped folders, resume, wording."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedseg.cli.simulate_command import print_dice_table
from fedseg.data.dataset import load_dataset
from fedseg.errors import InputError
from fedseg.federation.run_folder import discover_sites
from fedseg.federation.run_setup import plan_and_init, plan_differences
from fedseg.planning.fingerprint import compute_fingerprint


@pytest.mark.parametrize("rounds,iterations,overrides,fragment", [
    (1, None, {"training.rounds": "2"}, "--rounds 1 and --set training.rounds=2 disagree"),
    (2, 5, {"training.iterations_per_round": "7"}, "--iterations 5 and --set training.iterations_per_round=7 disagree"),
])
def test_an_option_and_set_that_disagree_are_refused(tmp_path: Path, rounds, iterations, overrides, fragment) -> None:
    with pytest.raises(InputError, match=fragment):
        plan_and_init(tmp_path / "run", [], strategy="fedavg", rounds=rounds, configuration="3d_fullres",
                      iterations=iterations, overrides=overrides, seed=1)
    assert not (tmp_path / "run").exists()


def test_resume_with_another_plan_names_what_differs(tiny_sites: Path, tmp_path: Path) -> None:
    fingerprints = [compute_fingerprint(load_dataset(tiny_sites / s), s) for s in ("site_a", "site_b")]
    common = dict(strategy="fedavg", configuration="3d_fullres", iterations=2, seed=1)
    # the option and --set agree: accepted, and the plan holds the value
    plans = plan_and_init(tmp_path / "run", fingerprints, rounds=2, overrides={"training.rounds": "2"}, **common)
    assert plans.training.rounds == 2
    with pytest.raises(InputError, match=r"differs at training\.rounds: 2 -> 3\)"):
        plan_and_init(tmp_path / "run", fingerprints, rounds=3, overrides={}, **common)


def test_plan_differences_lists_dotted_paths() -> None:
    old = {"training": {"rounds": 2, "lr": 0.01}, "keys": {}, "extra": {"big": list(range(50))}}
    new = {"training": {"rounds": 3, "lr": 0.01}, "keys": {"a": "ff"}, "extra": {"big": list(range(51))}}
    assert plan_differences(old, new) == ["extra.big", "keys.a (added)", "training.rounds: 2 -> 3"]


def test_folders_without_dataset_json_are_named(tmp_path: Path) -> None:
    for name in ("site_a", "site_b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text("{}")
    (tmp_path / "site_c").mkdir()                 # a site whose dataset.json is missing
    (tmp_path / "_server_test").mkdir()           # not a site, by convention: not mentioned
    (tmp_path / "notes.txt").write_text("")
    heard: list[str] = []
    assert [p.name for p in discover_sites(tmp_path, heard.append)] == ["site_a", "site_b"]
    assert heard == [f"skipped 1 folder(s) of {tmp_path} without a dataset.json: site_c"]


def test_the_dice_table_says_round_in_the_singular(capsys: pytest.CaptureFixture) -> None:
    for rounds, text in ((1, "(1 round)"), (2, "(2 rounds)")):
        print_dice_table(SimpleNamespace(rounds=rounds, report_dir="run/report", test_metrics={}, val_dice={}))
        assert text in capsys.readouterr().out


def test_the_evaluation_table_names_what_was_evaluated() -> None:
    from rich.console import Console

    from fedseg.training.evaluation import format_table

    zero = {"dice": 0.5, "iou": 0.4, "accuracy": 0.9, "hd95": 3.0}
    result = {"n_cases": 2, "per_case": [{}, {}], "mean": {"lesion": zero}, "foreground_mean": zero}
    console = Console(file=io.StringIO(), width=100)
    console.print(format_table(result, name="site_a"))
    assert "site_a: mean over 2 case(s)" in console.file.getvalue()


def test_the_dice_plot_has_whole_round_ticks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from fedseg.federation.run_summary import plot_val_dice

    ticks: list[float] = []
    savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        ticks.extend(self.axes[0].get_xticks())
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plot_val_dice({"site_a": [0.5, 0.6], "site_b": [0.4, None]}, tmp_path / "dice.png")
    assert ticks and all(t == int(t) for t in ticks), ticks    # no 1.25, 1.5 between rounds 1 and 2
    assert (tmp_path / "dice.png").read_bytes()[:4] == b"\x89PNG"

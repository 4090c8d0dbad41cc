"""`plan --set` refuses what nothing reads or what makes no sense, with the same check that
init, train and aggregate apply; `simulate` checks every --set before its first file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cli_inputs import listing, refused

from fedseg.errors import InputError
from fedseg.planning.plans import TrainingSpec, load_plans
from fedseg.planning.settings import PLAN_SETTINGS

# (--set item, what the one-line error must name)
BAD_SETTINGS = [
    ("bogus_key=1", "bogus_key"),
    ("trainig.rounds=3", "did you mean 'training.rounds'"),
    ("training.round=3", "did you mean 'training.rounds'"),
    ("configuration.patchsize=32,32,32", "did you mean 'configuration.patch_size'"),
    ("weighting=bogus", "weighting"),
    ("group.site_a=CT", "flames"),
    ("clip_norm=-1", "clip_norm"),
    ("clip_norm=nan", "clip_norm"),
    ("clip_norm=abc", "clip_norm"),
    ("max_update_norm=nan", "max_update_norm"),
    ("max_update_norm=-3", "max_update_norm"),
    ("max_update_norm=1e400", "max_update_norm"),
    ("robust=mean", "robust"),
    ("robust=trimmed:0.7", "robust"),
    ("robust=-1", "robust"),
    ("robust=nan", "robust"),
    ("configuration.patch_size=100000,100000,100000", "configuration.patch_size"),
    ("configuration.patch_size=1024,1024,1024", "GB"),          # within the edge limit, beyond any accelerator
    ("configuration.patch_size=-16,16,16", "configuration.patch_size"),
    ("configuration.batch_size=0", "configuration.batch_size"),
    ("training.rounds=0", "training.rounds"),
    ("training.rounds=1e400", "training.rounds"),
    ("training.rounds=" + "9" * 400, "training.rounds"),
    ("training.iterations_per_round=2.5", "training.iterations_per_round"),
    ("training.initial_lr=0", "training.initial_lr"),
    ("training.momentum=1.5", "training.momentum"),
    ("training.weight_decay=-0.1", "training.weight_decay"),
    ("training.n_folds=1", "training.n_folds"),
    ("training.loss=mse", "training.loss"),
    ("seed=-1", "seed"),
]


@pytest.mark.parametrize("item, named", BAD_SETTINGS, ids=[item[:40] for item, _ in BAD_SETTINGS])
def test_plan_refuses(item: str, named: str, tiny_fingerprints: list[Path], tmp_path: Path, capsys) -> None:
    refused(["plan", *map(str, tiny_fingerprints), "-o", str(tmp_path / "plans.json"), "--set", item], capsys, named)
    assert listing(tmp_path) == set()


def test_every_training_field_has_a_setting() -> None:
    """A new TrainingSpec field without a --set entry could never be set (and would go unchecked)."""
    fields = {f"training.{f.name}" for f in dataclasses.fields(TrainingSpec)}
    assert fields == {k for k in PLAN_SETTINGS if k.startswith("training.")}


@pytest.mark.parametrize("item, expected", [
    ("training.rounds=7", ("training", "rounds", 7)),
    ("training.n_folds=3", ("training", "n_folds", 3)),
    ("training.momentum=0.9", ("training", "momentum", 0.9)),
    ("training.weight_decay=0.0001", ("training", "weight_decay", 0.0001)),
    ("configuration.batch_size=3", ("configuration", "batch_size", 3)),
])
def test_good_settings_reach_the_plan(item: str, expected, tiny_fingerprints: list[Path], tmp_path: Path) -> None:
    from fedseg.cli.main import run

    out = tmp_path / "plans.json"
    assert run(["plan", *map(str, tiny_fingerprints), "-o", str(out), "--set", item, "-q"]) == 0
    plans = load_plans(out)
    family, name, value = expected
    holder = plans.training if family == "training" else plans.configuration_for(None)
    assert getattr(holder, name) == value


@pytest.mark.parametrize("params, message", [
    ({"bogus_key": 1}, "bogus_key"),
    ({"weighting": "bogus"}, "weighting"),
    ({"robust": "mean"}, "robust"),
    ({"clip_norm": float("nan")}, "clip_norm"),
    ({"max_update_norm": -3}, "max_update_norm"),
])
def test_init_train_and_aggregate_refuse_what_plan_refuses(params: dict, message: str, tiny_plans: Path, tmp_path: Path) -> None:
    """A plan written by hand (or by an older fedseg) with a bad parameter is refused at round 0,
    at aggregation and by a site before training, with plan's own message."""
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.round_zero import initial_round
    from fedseg.federation.site_training import run_site_round
    from fedseg.federation.strategies import get_strategy

    plans = load_plans(tiny_plans)
    plans = dataclasses.replace(plans, strategy=dataclasses.replace(plans.strategy, params=params))
    with pytest.raises(InputError) as at_plan:
        get_strategy("fedavg").check_params(params)
    assert message in str(at_plan.value)
    calls = [
        lambda: initial_round(plans, tmp_path / "round_000"),
        lambda: aggregate_round(plans, [tmp_path / "none.safetensors"], tmp_path / "round_001"),
        lambda: run_site_round(plans, "site_a", tmp_path, tmp_path / "w.safetensors", tmp_path / "state", tmp_path / "u.safetensors"),
    ]
    for call in calls:
        with pytest.raises(InputError) as refusal:
            call()
        assert str(refusal.value) == str(at_plan.value)
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("item, named", [("bogus_key=1", "bogus_key"), ("robust=trimmed:0.7", "robust"),
                                         ("configuration.patch_size=100000,100000,100000", "patch_size")])
def test_simulate_writes_nothing_before_its_settings_are_checked(
    item: str, named: str, tiny_sites: Path, tmp_path: Path, capsys,
) -> None:
    run_dir = tmp_path / "run"
    refused(["simulate", str(tiny_sites), "-o", str(run_dir), "--set", item], capsys, named)
    assert not run_dir.exists()


def test_simulate_refusal_that_needs_the_sites_leaves_no_file(tiny_sites: Path, tmp_path: Path, capsys) -> None:
    """A patch that only the planned network shows to be too large is refused after the
    fingerprints are computed but before any is written: the corrected rerun starts afresh."""
    from fedseg.federation.run_folder import check_run_folder

    run_dir = tmp_path / "run"
    refused(["simulate", str(tiny_sites), "-o", str(run_dir), "-q", "--set", "configuration.patch_size=1024,1024,1024"],
            capsys, "GB")
    assert not run_dir.exists() or listing(run_dir) == set()
    check_run_folder(run_dir, resume=False)   # the rerun is not "a different plan" nor "holds files"


def test_flower_serve_checks_settings_before_waiting_for_sites(tmp_path: Path, capsys) -> None:
    pytest.importorskip("flwr")
    refused(["flower", "serve", "-o", str(tmp_path / "run"), "--sites", "2", "--insecure", "--set", "trainig.rounds=2"],
            capsys, "did you mean 'training.rounds'")
    assert not (tmp_path / "run").exists()


def test_a_plan_from_fresh_fingerprints_equals_the_resumed_one(tiny_sites: Path, tmp_path: Path) -> None:
    """simulate plans before it writes the fingerprints; a --resume reads them back: both must
    give the same plan_id, or the resumed run would be refused as a different plan."""
    from fedseg.data.dataset import load_dataset
    from fedseg.federation.run_setup import as_stored, plan_run
    from fedseg.planning.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint

    fresh, stored = [], []
    for site in ("site_a", "site_b", "site_c"):
        fp = compute_fingerprint(load_dataset(tiny_sites / site), site)
        fresh.append(as_stored(fp))
        save_fingerprint(fp, tmp_path / f"{site}.json")
        stored.append(load_fingerprint(tmp_path / f"{site}.json"))
    common = dict(strategy="fedavg", rounds=1, configuration="3d_fullres", iterations=None, overrides={}, seed=1)
    assert plan_run(fresh, **common).plan_id == plan_run(stored, **common).plan_id


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["training"].update(rounds=10 ** 400), "training.rounds"),
    (lambda d: d["training"].update(momentum=1.5), "training.momentum"),
    (lambda d: d["configurations"]["3d_fullres"].update(patch_size=[100000, 100000, 100000]), "patch_size"),
    (lambda d: d["configurations"]["3d_fullres"].update(patch_size=[2048, 2048, 2048]), "GB"),
    (lambda d: d["configurations"]["3d_fullres"].update(batch_size=10 ** 9), "batch_size"),
])
def test_a_hand_made_plan_with_a_recomputed_plan_id_is_checked_too(edit, named: str, tiny_plans: Path, tmp_path: Path,
                                                                    capsys) -> None:
    """plan_id is a content hash anyone can recompute: every command reading a plan applies
    the --set rules to it (here init and train), naming the file."""
    import hashlib
    import json

    from fedseg.planning.plans import canonical_json

    body = json.loads(tiny_plans.read_text())
    body.pop("plan_id")
    edit(body)
    body["plan_id"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
    hostile = tmp_path / "plans.json"
    hostile.write_text(json.dumps(body))
    out = tmp_path / "out"
    refused(["init", "--plans", str(hostile), "-o", str(out / "round_000")], capsys, str(hostile), named)
    refused(["train", "--site", "site_a", "--data", str(tmp_path), "--plans", str(hostile), "--weights", str(hostile),
             "--state", str(out / "state"), "-o", str(out / "u.safetensors")], capsys, str(hostile), named)
    assert not out.exists()


def test_a_plan_holding_infinity_is_refused_naming_the_file(tiny_plans: Path, tmp_path: Path, capsys) -> None:
    hostile = tmp_path / "plans.json"
    hostile.write_text(tiny_plans.read_text().replace('"momentum": 0.99', '"momentum": Infinity'))
    refused(["init", "--plans", str(hostile), "-o", str(tmp_path / "round_000")], capsys, str(hostile), "Out of range")
    assert listing(tmp_path) == {"plans.json"}


@pytest.mark.parametrize("strategy, item, named", [
    ("fedsam", "sam.lr=1e400", "sam.lr"),
    ("fedsam", "sam.config=vit_z", "sam.config"),
    ("mixmfl", "lambda_cls=1e400", "lambda_cls"),
    ("mixmfl", "memory_size=0", "memory_size"),
    ("mixmfl", "tailored=maybe", "tailored"),
    ("flames", "alpha=2", "alpha"),
    ("flames", "group.nobody=US", "nobody"),
    ("asymfedavg", "local_norms=yes", "local_norms"),
    ("local", "weighting=uniform", "weighting"),
])
def test_plan_refuses_strategy_values(strategy: str, item: str, named: str, tiny_fingerprints: list[Path], tmp_path: Path,
                                      capsys) -> None:
    refused(["plan", *map(str, tiny_fingerprints), "--strategy", strategy, "-o", str(tmp_path / "plans.json"),
             "--set", item], capsys, named)
    assert listing(tmp_path) == set()

"""The Flower coordinator with a quorum: a failing or silent site is recorded, the round goes on.

The ServerApp's loop (`run_federation`) runs against a stand-in for Flower's Grid whose
"sites" answer from functions, so every failure mode is exercised in seconds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402

from fedseg.data.dataset import load_dataset  # noqa: E402
from fedseg.errors import InputError  # noqa: E402
from fedseg.federation.site_update import compose_site_state, write_site_update  # noqa: E402
from fedseg.federation.run_status import run_status  # noqa: E402
from fedseg.federation.signing import generate_key, load_signing_key  # noqa: E402
from fedseg.planning.fingerprint import compute_fingerprint  # noqa: E402
from fedseg.planning.plans import Plans  # noqa: E402
from fedseg.transport.apps import CONFIG, FILES, bundle_record, record_bundle, run_federation  # noqa: E402
from fedseg.transport.coordinator import CoordinatorSettings  # noqa: E402
from fedseg.transport.payload import read_weight_bundle, write_weight_bundle  # noqa: E402

SITES = ("site_a", "site_b", "site_c")
# what a site does with a train message in a given round: "ok", "error" (its ClientApp reports a
# fault) or "silent" (no reply before the round timeout)
Behaviour = Callable[[str, int], str]


class FakeGrid:
    """Flower's Grid as run_federation uses it: node ids, push_messages and pull_messages, sites
    answered locally when their message is pulled, `per_pull` replies at most per pull."""

    def __init__(self, fingerprints: dict[str, dict], behaviour: Behaviour, workdir: Path, keys: Path | None = None,
                 per_pull: int | None = None) -> None:
        self.sites = {100 + i: site for i, site in enumerate(SITES)}
        self.fingerprints, self.behaviour, self.workdir = fingerprints, behaviour, workdir
        self.keys = keys          # folder of <site>.key: the sites sign their updates
        self.per_pull = per_pull
        self.pending: dict[str, Message] = {}
        self.pushed: list[list[Message]] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.sites)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())   # as Flower's grids do
            self.pending[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        self.pushed.append([self.pending[i] for i in ids])
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in sorted(message_ids):
            if self.per_pull is not None and len(replies) == self.per_pull:
                break
            message = self.pending[message_id]
            reply = self._answer(self.sites[message.metadata.dst_node_id], message)
            if reply is not None:
                del self.pending[message_id]
                replies.append(reply)
        return replies

    def _answer(self, site: str, message: Message) -> Message | None:
        kind = message.metadata.message_type
        if kind == "query":
            return _reply(message, {"site": site, "fingerprint": json.dumps(self.fingerprints[site])})
        if kind == "evaluate":
            return _reply(message, {"site": site, "metrics": "null"})
        config = message.content[CONFIG]
        r = int(config["round"])
        action = self.behaviour(site, r)
        if action == "silent":
            return None
        if action == "error":
            return _reply(message, {"site": site, "error": "cannot read case 7 (disk full)"})
        plans = Plans.from_dict(json.loads(str(config["plans"])))
        model = write_weight_bundle(record_bundle(message.content[FILES], "coordinator"),
                                    self.workdir / site / f"model_{r}.safetensors", "coordinator")
        # as a site does: the incoming model must carry the coordinator's signature when the plan lists keys
        tensors = compose_site_state(plans, site, model, None)   # the U-Net keeps no local-only tensors
        state = {k: v + np.float32(0.01 * r) if v.dtype.kind == "f" else v for k, v in tensors.items()}
        update = self.workdir / site / f"update_{r}.safetensors"
        signing_key = load_signing_key(self.keys / f"{site}.key") if self.keys else None
        write_site_update(plans, site, state, update, round_index=r, n_iterations=1, extra={"val_dice": 0.5},
                          signing_key=signing_key)
        return _reply(message, {"site": site, "round": r, "seconds": 0.1, "val_dice": 0.5}, read_weight_bundle(update))


def _reply(message: Message, config: dict, bundle: dict | None = None) -> Message:
    content = RecordDict({CONFIG: ConfigRecord(config)})
    if bundle is not None:
        content[FILES] = bundle_record(bundle)
    return Message(content, reply_to=message)


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the identity of the process's task (set by its runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def fingerprints(tiny_sites: Path) -> dict[str, dict]:
    return {s: compute_fingerprint(load_dataset(tiny_sites / s), s) for s in SITES}


def settings(run_dir: Path, min_sites: int) -> CoordinatorSettings:
    return CoordinatorSettings(run_dir=run_dir, rounds=2, iterations=1, overrides={"min_sites": str(min_sites)},
                               round_timeout=30.0)


def test_a_failing_site_is_recorded_and_rejoins_next_round(fingerprints, tmp_path: Path) -> None:
    grid = FakeGrid(fingerprints, lambda site, r: "error" if (site, r) == ("site_c", 1) else "ok", tmp_path / "sites")
    log: list[str] = []
    run_federation(grid, settings(tmp_path / "run", 2), n_sites=3, wait_s=5, log=log.append)
    round1 = json.loads((tmp_path / "run" / "round_001" / "aggregate.json").read_text())
    assert round1["missing_sites"] == ["site_c"]
    assert "disk full" in json.loads((tmp_path / "run" / "round_001" / "site_failures.json").read_text())["site_c"]
    assert any("round 1 site_c: left out of this round" in line for line in log)
    round2 = json.loads((tmp_path / "run" / "round_002" / "aggregate.json").read_text())
    assert round2["missing_sites"] == [] and sorted(i["site"] for i in round2["inputs"]) == list(SITES)
    state = run_status(tmp_path / "run")
    assert state.rounds_completed == 2 and "disk full" in state.rounds[0].failures["site_c"]
    from fedseg.cli.run_commands import format_status
    from fedseg.federation.run_report import render_html

    assert "missing site_c (site site_c: cannot read case 7 (disk full))" in format_status(state)
    assert "<td>site_c (site site_c: cannot read case 7 (disk full))</td>" in render_html(state)


def test_below_quorum_the_run_stops_naming_the_sites(fingerprints, tmp_path: Path) -> None:
    grid = FakeGrid(fingerprints, lambda site, r: {"site_b": "silent", "site_c": "error"}.get(site, "ok"), tmp_path / "s")
    quick = settings(tmp_path / "run", 2)
    quick.round_timeout = 0.5   # the silent site is waited for this long
    with pytest.raises(InputError) as info:
        run_federation(grid, quick, n_sites=3, wait_s=5)
    message = str(info.value)
    assert "1 of 3 site update(s), the plan needs 2" in message and "missing: site_b, site_c" in message
    assert "no reply within 0.5s" in message and "disk full" in message
    assert not (tmp_path / "run" / "round_001" / "aggregate.json").exists()
    assert sorted(json.loads((tmp_path / "run" / "round_001" / "site_failures.json").read_text())) == ["site_b", "site_c"]


def test_serve_carries_the_round_timeout_to_the_server_app(tmp_path: Path) -> None:
    """`flower serve` writes its options into the app's run config; the deployed ServerApp reads them back."""
    import tomllib

    from fedseg.transport.apps import settings_from_run_config
    from fedseg.transport.deploy import write_app_folder

    for timeout in (45.0, None):
        written = settings(tmp_path / "run", 2)
        written.round_timeout = timeout
        app = write_app_folder(tmp_path / f"app_{timeout}", written, n_sites=3, wait_s=60)
        config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
        read, n_sites, wait_s = settings_from_run_config(config)
        assert read.round_timeout == timeout and read.overrides == {"min_sites": "2"} and n_sites == 3 and wait_s == 60


def test_a_signed_federation_over_the_flower_coordinator(fingerprints, tmp_path: Path) -> None:
    """Keys in the plan: sites sign their updates, the coordinator checks them and signs what it sends."""
    keys = tmp_path / "keys"
    for signer in ("coordinator", *SITES):
        generate_key(signer, keys)
    signed = settings(tmp_path / "run", 3)
    signed.keys, signed.key = keys, keys / "coordinator.key"
    grid = FakeGrid(fingerprints, lambda site, r: "ok", tmp_path / "sites", keys=keys)
    run_federation(grid, signed, n_sites=3, wait_s=5)
    plans = json.loads((tmp_path / "run" / "plans.json").read_text())
    assert sorted(plans["keys"]) == ["coordinator", *SITES]
    for r in (1, 2):
        record = json.loads((tmp_path / "run" / f"round_{r:03d}" / "aggregate.json").read_text())
        assert record["signed_by"] == "coordinator" and record["missing_sites"] == []
    assert run_status(tmp_path / "run").rounds[1].signed is True
    # an unsigned update is refused before any arithmetic, naming the site's file
    unsigned = FakeGrid(fingerprints, lambda site, r: "ok", tmp_path / "unsigned", keys=None)
    other = settings(tmp_path / "run2", 3)
    other.keys, other.key = keys, keys / "coordinator.key"
    with pytest.raises(InputError, match=r"site_a\.safetensors.*(signature|\.sig)"):
        run_federation(unsigned, other, n_sites=3, wait_s=5)


def test_the_coordinator_holds_one_update_at_a_time(fingerprints, tmp_path: Path) -> None:
    """Bounded memory with many sites: each update is written to the run folder as its reply is
    pulled, before the next one arrives, and fedavg's sites are sent one shared copy of the model."""
    on_disk: dict[int, list[int]] = {1: [], 2: []}   # round -> updates in its folder at each pull

    class OneByOne(FakeGrid):
        def pull_messages(self, message_ids):
            kinds = {self.pending[i].metadata.message_type for i in message_ids}
            if kinds == {"train"}:
                r = int(self.pending[next(iter(message_ids))].content[CONFIG]["round"])
                on_disk[r].append(len(list((tmp_path / "run" / f"round_{r:03d}").glob("updates/*.safetensors"))))
            return super().pull_messages(message_ids)

    grid = OneByOne(fingerprints, lambda site, r: "ok", tmp_path / "sites", per_pull=1)
    run_federation(grid, settings(tmp_path / "run", 3), n_sites=3, wait_s=5)
    # each round's pulls saw 0, 1 then 2 updates on disk: the ServerApp wrote each as it came
    assert on_disk == {1: [0, 1, 2], 2: [0, 1, 2]}
    # round 1 starts from round_000's per-site files (each names its site); round 2 and the final
    # evaluation send round 1's and 2's global model, the same bytes for every site
    shared = [batch for batch in grid.pushed if batch[0].metadata.message_type in ("train", "evaluate")][1:]
    assert len(shared) == 2
    for batch in shared:
        models = [message.content[FILES]["weights.safetensors"].data for message in batch]
        assert len(models) == 3 and all(model is models[0] for model in models)   # one object, not a copy per site


def test_a_window_bounds_the_models_out_at_once(fingerprints, tmp_path: Path) -> None:
    """`fedseg flower simulate` sends at most `window` models at a time (the next when a reply
    comes back), so the messages waiting in Flower's state do not grow with the sites."""
    most: list[int] = []

    class Counting(FakeGrid):
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            most.append(len(self.pending))
            return ids

    grid = Counting(fingerprints, lambda site, r: "ok", tmp_path / "sites", per_pull=1)
    run_federation(grid, settings(tmp_path / "run", 3), n_sites=3, wait_s=5, window=2)
    batches = [[m.metadata.message_type for m in batch] for batch in grid.pushed]
    # hello to all three at once; then per round and for the evaluation: two, then one as a reply came back
    assert batches == [["query"] * 3] + [["train"] * 2, ["train"]] * 2 + [["evaluate"] * 2, ["evaluate"]]
    assert max(most[1:]) == 2
    for r in (1, 2):
        record = json.loads((tmp_path / "run" / f"round_{r:03d}" / "aggregate.json").read_text())
        assert sorted(i["site"] for i in record["inputs"]) == list(SITES)
    # round 2's three sites, sent in two batches, still share one copy of the global model
    round2 = [m for batch in grid.pushed[3:5] for m in batch]
    models = [m.content[FILES]["weights.safetensors"].data for m in round2]
    assert len(models) == 3 and all(model is models[0] for model in models)

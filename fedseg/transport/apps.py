"""The Flower ServerApp and ClientApp (needs `fedseg[flower]`; imports flwr).

Messages carry fedseg's payloads and nothing else:

    query     reply {"fedseg.config": {"site", "fingerprint" (JSON)}}: who is there, and its fingerprint
    train     sent  {"fedseg.files": model bundle, "fedseg.config": {"plans", "round", "iterations"}}
              reply {"fedseg.files": update bundle, "fedseg.config": {"site", "round", "val_dice", "seconds"}}
    evaluate  sent  {"fedseg.files": final model bundle, "fedseg.config": {"plans", "round"}}
              reply {"fedseg.config": {"site", "metrics" (JSON)}}

A bundle is a weight file's bytes and its `.sig` (fedseg.transport.payload), each carried as one
Flower `Array` of raw bytes in an `ArrayRecord`. Flower sends an Array's bytes in chunks of
`FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE` (5 MiB in flwr 1.41), one object per request, so a 3D
network's update of hundreds of MB never meets a transport message limit (`max_payload_chunk`).

A site that fails with an InputError answers with {"error": message}. During a round, a site
that fails or does not answer within the round timeout is left out and recorded
(round_r/site_failures.json and aggregate.json's `missing_sites`); the round goes on when the
plan's quorum (`min_sites`) holds, and the site is asked again next round. Below the quorum
the coordinator stops, naming the missing sites.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.logger import log as flower_log

from fedseg.errors import InputError
from fedseg.federation.quorum import check_quorum
from fedseg.transport.coordinator import Coordinator, CoordinatorSettings
from fedseg.transport.payload import WEIGHTS
from fedseg.transport.site import SiteSettings, site_evaluate, site_hello, site_train

FILES = "fedseg.files"
CONFIG = "fedseg.config"
_STYPE = "fedseg.bytes"          # raw bytes, not an .npy serialisation: no copy, no numpy header


# ---------------------------------------------------------------------------------------
# payload <-> records
# ---------------------------------------------------------------------------------------
def bundle_record(bundle: Mapping[str, bytes]) -> ArrayRecord:
    """A weight bundle as an ArrayRecord: one uint8 Array of raw bytes per entry."""
    return ArrayRecord({name: Array(dtype="uint8", shape=(len(data),), stype=_STYPE, data=bytes(data))
                        for name, data in sorted(bundle.items())})


def record_bundle(record: ArrayRecord, sender: str) -> dict[str, bytes]:
    bundle = {}
    for name, array in record.items():
        if array.stype != _STYPE:
            raise InputError(f"{sender} sent a {array.stype!r} array, expected fedseg's raw bytes")
        bundle[name] = array.data
    return bundle


def max_payload_chunk() -> int:
    """Largest piece of an Array Flower puts in one transport request (bytes)."""
    return int(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)


def _reply(message: Message, config: dict[str, Any], bundle: Mapping[str, bytes] | None = None) -> Message:
    content = RecordDict({CONFIG: ConfigRecord(config)})
    if bundle is not None:
        content[FILES] = bundle_record(bundle)
    return Message(content=content, reply_to=message)


# ---------------------------------------------------------------------------------------
# ClientApp
# ---------------------------------------------------------------------------------------
def make_client_app(resolve: Callable[[Context], SiteSettings]) -> ClientApp:
    """A ClientApp answering query/train/evaluate for the site `resolve(context)` names."""
    app = ClientApp()

    def guarded(handler: Callable[[Message, SiteSettings], Message]) -> Callable[[Message, Context], Message]:
        def run(message: Message, context: Context) -> Message:
            settings = resolve(context)
            try:
                return handler(message, settings)
            except InputError as exc:
                return _reply(message, {"site": settings.site, "error": str(exc)})

        return run

    @app.query()
    @guarded
    def hello(message: Message, settings: SiteSettings) -> Message:
        answer = site_hello(settings)
        return _reply(message, {"site": answer["site"], "fingerprint": json.dumps(answer["fingerprint"])})

    @app.train()
    @guarded
    def train(message: Message, settings: SiteSettings) -> Message:
        config = message.content[CONFIG]
        iterations = int(config["iterations"]) or None
        reply = site_train(
            settings, str(config["plans"]), record_bundle(message.content[FILES], "the coordinator"),
            int(config["round"]), iterations,
        )
        info = {"site": settings.site, "round": reply.round, "seconds": float(reply.seconds)}
        if reply.val_dice is not None:
            info["val_dice"] = float(reply.val_dice)
        return _reply(message, info, reply.update)

    @app.evaluate()
    @guarded
    def evaluate(message: Message, settings: SiteSettings) -> Message:
        config = message.content[CONFIG]
        metrics = site_evaluate(
            settings, str(config["plans"]), record_bundle(message.content[FILES], "the coordinator"), int(config["round"])
        )
        return _reply(message, {"site": settings.site, "metrics": json.dumps(metrics)})

    return app


def site_from_node_config(context: Context) -> SiteSettings:
    """A SuperNode's site, from its --node-config (written by `fedseg flower join`)."""
    node = context.node_config
    missing = [k for k in ("site", "data", "state") if k not in node]
    if missing:
        raise InputError(f"the SuperNode's --node-config lacks {', '.join(missing)}; start it with `fedseg flower join`")
    return SiteSettings(
        site=str(node["site"]), data=Path(str(node["data"])), state=Path(str(node["state"])),
        key=Path(str(node["key"])) if node.get("key") else None, device=str(node.get("device", "cpu")),
        workers=int(node.get("workers", 2)), plan_id=str(node["plan-id"]) if node.get("plan-id") else None,
    )


# ---------------------------------------------------------------------------------------
# ServerApp
# ---------------------------------------------------------------------------------------
def _exchange(grid: Grid, nodes: Mapping[str, int], message_type: str,
              build: Callable[[str], tuple[dict[str, Any], Mapping[str, bytes] | None]],
              timeout_s: float | None = None, failures: dict[str, str] | None = None,
              receive: Callable[[str, Message], Any] = lambda site, reply: reply,
              window: int | None = None, poll_s: float = 0.1) -> dict[str, Any]:
    """Send one message per site; `receive(site, reply)` for each reply as it arrives.

    Returns site -> what `receive` returned. Replies are pulled as they come (Flower's
    push_messages / pull_messages, not send_and_receive, which holds every reply until the
    last): a `receive` that writes the reply's payload to disk keeps the coordinator's memory
    independent of the number of sites. So do the outgoing models: with `window`, at most that
    many messages wait for a reply (the next site's is built when one comes back; on one
    machine only `parallel` sites train at once anyway), and sites sent the same bytes in a row
    (fedavg's one global model) share one copy of them.

    Without `failures`, a failed or missing reply stops the run. With it (a dict), a site that
    fails, or does not answer within `timeout_s` (counted from the first message), is recorded
    there (site -> reason) and the other sites' replies are returned: the caller decides
    whether the quorum holds.
    """
    order = sorted(nodes.items())
    by_node = {node: site for site, node in order}
    shared: dict[bytes, bytes] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waiting: set[str] = set()
    received: dict[str, Any] = {}
    sent = 0
    while True:
        room = len(order) - sent if window is None else min(window - len(waiting), len(order) - sent)
        if room > 0:
            batch = [_message(site, node, message_type, build(site), shared) for site, node in order[sent:sent + room]]
            sent += room
            waiting.update(grid.push_messages(batch))
            del batch   # Flower's state holds each message until its reply is pulled
        for reply in grid.pull_messages(waiting) if waiting else []:
            waiting.discard(reply.metadata.reply_to_message_id)
            site = by_node.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
            try:
                _check_reply(reply, site)
            except (InputError, RuntimeError) as exc:
                if failures is None:
                    raise
                failures[site] = str(exc)
                continue
            received[site] = receive(site, reply)
        if not waiting and sent == len(order):
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        if waiting and (window is None or len(waiting) >= window or sent == len(order)):
            time.sleep(poll_s)
    missing = sorted(set(nodes) - set(received) - set(failures or {}))
    if missing and failures is None:
        raise InputError(f"no {message_type} reply from site(s) {', '.join(missing)}")
    for site in missing:
        failures[site] = f"site {site}: no reply within {timeout_s:g}s" if timeout_s else f"site {site}: no reply"
    return received


def _message(site: str, node: int, message_type: str, built: tuple[dict[str, Any], Mapping[str, bytes] | None],
             shared: dict[bytes, bytes]) -> Message:
    """The message for `site`; a payload equal to the previous one reuses its bytes (`shared`
    keeps only the latest payload, so it never holds more than one extra copy)."""
    config, bundle = built
    content = RecordDict({CONFIG: ConfigRecord(config)})
    if bundle is not None:
        files = {}
        for name, data in bundle.items():
            if data not in shared:
                if name == WEIGHTS:
                    shared.clear()
                shared[data] = data
            files[name] = shared[data]
        content[FILES] = bundle_record(files)
    return Message(content=content, dst_node_id=node, message_type=message_type)


def _check_reply(reply: Message, site: str) -> None:
    if reply.has_error():
        raise RuntimeError(f"site {site}: the ClientApp failed: {reply.error.reason}")
    error = reply.content[CONFIG].get("error")
    if error:
        raise InputError(f"site {site}: {error}")


def wait_for_nodes(grid: Grid, n_sites: int, timeout_s: float, poll_s: float = 0.5) -> list[int]:
    """Node ids once `n_sites` SuperNodes are connected (InputError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n_sites:
            return nodes
        if time.monotonic() > deadline:
            raise InputError(f"only {len(nodes)} of {n_sites} site(s) connected within {timeout_s:.0f}s")
        time.sleep(poll_s)


def run_federation(grid: Grid, settings: CoordinatorSettings, n_sites: int, wait_s: float = 600.0,
                   log: Callable[[str], None] = lambda message: None, window: int | None = None):
    """The whole federation from the coordinator's seat: hello, plan, rounds, evaluation, report.

    `window`: most models out at once awaiting a site's reply (None: every site's at once, as
    sites on their own machines all train together; `fedseg flower simulate` bounds it)."""
    coordinator = Coordinator(settings, log)
    node_ids = wait_for_nodes(grid, n_sites, wait_s)
    hello = _exchange(grid, {f"node {n}": n for n in node_ids}, "query", lambda _key: ({"action": "hello"}, None))
    nodes: dict[str, int] = {}
    fingerprints: dict[str, dict] = {}
    for reply in hello.values():
        site = str(reply.content[CONFIG]["site"])
        if site in nodes:
            raise InputError(f"two SuperNodes both say they are site {site!r}")
        nodes[site] = reply.metadata.src_node_id
        fingerprints[site] = json.loads(str(reply.content[CONFIG]["fingerprint"]))
    log(f"{len(nodes)} site(s) connected: {', '.join(sorted(nodes))}")
    plans = coordinator.plan(fingerprints)
    plans_json = coordinator.plans_json
    iterations = settings.iterations or 0
    for r in coordinator.pending_rounds():
        failures: dict[str, str] = {}
        updates = _exchange(grid, nodes, "train", lambda site: (
            {"plans": plans_json, "round": r, "iterations": iterations}, coordinator.model_for(site, r)),
            timeout_s=settings.round_timeout, failures=failures, window=window,
            receive=lambda site, reply: _receive_update(coordinator, r, site, reply, log))
        for site, reason in sorted(failures.items()):
            log(f"round {r} {site}: left out of this round ({reason})")
        try:
            check_quorum(plans, updates, r)
        except InputError as exc:   # below the plan's min_sites: stop, naming the sites and why
            coordinator.record_failures(r, failures)
            raise InputError(f"{exc} ({'; '.join(failures[s] for s in sorted(failures))})") from None
        coordinator.aggregate(r, updates, failures)
    final = plans.training.rounds
    failures = {}
    replies = _exchange(grid, nodes, "evaluate", lambda site: (
        {"plans": plans_json, "round": final}, coordinator.final_model_for(site)),
        timeout_s=settings.round_timeout, failures=failures, window=window)
    for site, reason in sorted(failures.items()):
        log(f"evaluation {site}: no test metrics ({reason})")
    metrics = {}
    for site, reply in replies.items():
        value = json.loads(str(reply.content[CONFIG]["metrics"]))
        if value is not None:
            metrics[site] = value
    return coordinator.finish(sorted(nodes), metrics)


def _receive_update(coordinator: Coordinator, r: int, site: str, reply: Message, log: Callable[[str], None]) -> Path:
    """Log a site's round reply and write its update to the run folder at once (its file)."""
    info = reply.content[CONFIG]
    dice = info.get("val_dice")
    log(f"round {r} {site}: val Dice {'-' if dice is None else f'{dice:.3f}'} ({float(info['seconds']):.1f}s)")
    return coordinator.receive_update(r, site, record_bundle(reply.content[FILES], f"site {site!r}"))


def make_server_app(settings: CoordinatorSettings, n_sites: int, wait_s: float = 600.0,
                    log: Callable[[str], None] = lambda message: None,
                    results: list | None = None, window: int | None = None) -> ServerApp:
    """A ServerApp running `run_federation`; the SimulationResult is appended to `results`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_federation(grid, settings, n_sites, wait_s, log, window=window)
        if results is not None:
            results.append(result)

    return app


# ---------------------------------------------------------------------------------------
# the apps a SuperLink/SuperNode deployment loads (fedseg flower serve / join)
# ---------------------------------------------------------------------------------------
def settings_from_run_config(config: Mapping[str, Any]) -> tuple[CoordinatorSettings, int, float]:
    """CoordinatorSettings, number of sites and wait time from the run config `fedseg flower serve` writes."""
    def optional_path(key: str) -> Path | None:
        return Path(str(config[key])) if config.get(key) else None

    settings = CoordinatorSettings(
        run_dir=Path(str(config["run-dir"])), strategy=str(config["strategy"]), rounds=int(config["rounds"]),
        configuration=str(config["configuration"]), iterations=int(config["iterations"]) or None,
        overrides=json.loads(str(config["set"])), seed=int(config["seed"]),
        keys=optional_path("keys"), key=optional_path("key"),
        round_timeout=float(config.get("round-timeout", 0)) or None,
    )
    return settings, int(config["sites"]), float(config["wait"])


def _flower_log(message: str) -> None:
    flower_log(INFO, "fedseg: %s", message)


client_app = make_client_app(site_from_node_config)
server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    settings, n_sites, wait_s = settings_from_run_config(context.run_config)
    run_federation(grid, settings, n_sites, wait_s, _flower_log)

"""fedseg over Flower: one combine code path, a simulated federation, a loopback deployment."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from fedseg.cli.main import run as cli  # noqa: E402
from fedseg.federation.site_update import write_site_update  # noqa: E402
from fedseg.federation.run_setup import plan_and_init  # noqa: E402
from fedseg.federation.single_machine import SimulationConfig, simulate  # noqa: E402
from fedseg.federation.weightfile import read_weight_file  # noqa: E402
from fedseg.planning.fingerprint import compute_fingerprint  # noqa: E402
from fedseg.data.dataset import load_dataset  # noqa: E402
from fedseg.transport.apps import bundle_record, max_payload_chunk, record_bundle  # noqa: E402
from fedseg.transport.coordinator import Coordinator, CoordinatorSettings  # noqa: E402
from fedseg.transport.payload import WEIGHTS, read_weight_bundle  # noqa: E402

SITES = ("site_a", "site_b", "site_c")


@pytest.fixture(scope="module")
def tiny_fingerprints(tiny_sites: Path) -> list[dict]:
    return [compute_fingerprint(load_dataset(tiny_sites / s), s) for s in SITES]


def _updates(plans, run_dir: Path, seed: int) -> list[Path]:
    """Round-1 updates without training: each site's round-0 model, perturbed."""
    rng = np.random.default_rng(seed)
    paths = []
    for site in SITES:
        tensors, _meta = read_weight_file(run_dir / "round_000" / f"{site}.safetensors")
        state = {k: (v + rng.normal(0, 0.01, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v for k, v in tensors.items()}
        path = run_dir / "sent" / f"{site}.safetensors"
        write_site_update(plans, site, state, path, round_index=1, n_iterations=3, n_cases=2 + SITES.index(site))
        paths.append(path)
    return paths


def _tensors(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    files = sorted(folder.glob("*.safetensors")) + sorted((folder / "models").glob("*.safetensors"))
    return {str(p.relative_to(folder)): read_weight_file(p)[0] for p in files}


@pytest.mark.parametrize("strategy,overrides", [("fedavg", {}), ("flames", {"group.site_c": "OTHER"})])
def test_flower_server_side_aggregates_exactly_as_fedseg_aggregate(
    tiny_fingerprints, tmp_path: Path, strategy: str, overrides: dict
) -> None:
    run_dir = tmp_path / "run"
    plans = plan_and_init(run_dir, tiny_fingerprints, strategy=strategy, rounds=2, configuration="3d_fullres",
                          iterations=2, overrides=overrides, seed=1234)
    sent = _updates(plans, run_dir, seed=7)
    # file route: `fedseg aggregate`
    assert cli(["aggregate", "--plans", str(run_dir / "plans.json"), *map(str, sent), "-o", str(tmp_path / "by_file"), "-q"]) == 0
    # Flower route: each update travels as the ArrayRecord a ClientApp replies with
    coordinator = Coordinator(CoordinatorSettings(run_dir=run_dir, strategy=strategy, rounds=2, iterations=2,
                                                  overrides=overrides))
    coordinator.plan({fp["site"]: fp for fp in tiny_fingerprints})       # resumes: same plan, round_000 kept
    received = {p.stem: record_bundle(bundle_record(read_weight_bundle(p)), p.stem) for p in sent}
    assert all(received[p.stem][WEIGHTS] == p.read_bytes() for p in sent)  # byte for byte
    report = coordinator.aggregate(1, {site: coordinator.receive_update(1, site, bundle) for site, bundle in received.items()})
    assert sorted(i.site for i in report.inputs) == list(SITES)

    by_file, by_flower = _tensors(tmp_path / "by_file"), _tensors(run_dir / "round_001")
    assert by_file.keys() == by_flower.keys()
    for name in by_file:
        assert by_file[name].keys() == by_flower[name].keys()
        for key in by_file[name]:
            np.testing.assert_array_equal(by_file[name][key], by_flower[name][key])
    if strategy == "flames":   # per-group models and personalised per-site models came through
        assert {"models/OTHER.safetensors"} < set(by_flower)
        a, b = by_flower["site_a.safetensors"], by_flower["site_b.safetensors"]
        assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_a_3d_sized_update_travels_in_small_pieces() -> None:
    """A ~120 MB update is cut by Flower into objects no larger than its chunk size (+ header)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    data = np.random.default_rng(0).integers(0, 255, 120 * 2**20, dtype=np.uint8).tobytes()
    record = bundle_record({WEIGHTS: data})
    objects = get_all_nested_objects(record)
    sizes = [len(obj.deflate()) for obj in objects.values()]
    assert len(sizes) >= 24 and max(sizes) <= max_payload_chunk() + 4096
    assert record_bundle(record, "test")[WEIGHTS] == data


@pytest.fixture(scope="module")
def flower_and_file_runs(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory):
    flower_dir = tmp_path_factory.mktemp("flower") / "run"
    # a separate process, as a user runs it, so that everything it prints (Ray's actors included) is seen
    done = subprocess.run(
        [sys.executable, "-m", "fedseg.cli.main", "flower", "simulate", str(tiny_sites), "--strategy", "fedavg",
         "--rounds", "2", "--iterations", "5", "--workers", "0", "-o", str(flower_dir)],
        capture_output=True, text=True, timeout=600,
    )
    code, printed = done.returncode, done.stdout + done.stderr
    file_dir = tmp_path_factory.mktemp("file") / "run"
    file_result = simulate(SimulationConfig(sites_root=tiny_sites, strategy="fedavg", rounds=2, run_dir=file_dir,
                                            iterations=5, workers=0))
    return code, flower_dir, file_dir, file_result, printed


def test_flower_simulate_writes_the_run_folder_and_learns_like_the_file_run(flower_and_file_runs) -> None:
    import json

    code, flower_dir, file_dir, file_result, printed = flower_and_file_runs
    assert code == 0, printed[-3000:]
    # plain log lines: fedseg's progress, without Flower's deprecation notice, Ray's tips or actor lines
    assert "round 2: 3 update(s) valid" in printed
    for noise in ("\x1b[", "DEPRECATED", "FutureWarning", "ClientAppActor"):
        assert noise not in printed, (noise, printed[-3000:])
    for r in (1, 2):
        record = json.loads((flower_dir / f"round_{r:03d}" / "aggregate.json").read_text())
        assert record["round"] == r and sorted(i["site"] for i in record["inputs"]) == list(SITES)
    # same plan, same starting files, same training code: the same Dice range. (Bit-identical
    # weights need the same CPU thread count too; Ray gives each site --cpus-per-site threads.)
    flower = json.loads((flower_dir / "report" / "metrics.json").read_text())
    for site in SITES:
        dice = flower["test"][site]["foreground_mean"]["dice"]
        expected = file_result.test_metrics[site]["foreground_mean"]["dice"]
        assert dice == pytest.approx(expected, abs=0.05) and dice > 0.5


@pytest.mark.slow   # a second Flower start (~15 s): kept out of the default suite
def test_flower_simulate_resumes_from_complete_rounds(flower_and_file_runs, tiny_sites: Path) -> None:
    _code, flower_dir, _file_dir, _, _printed = flower_and_file_runs
    stamp = (flower_dir / "round_002" / "aggregate.json").stat().st_mtime_ns
    assert cli(["flower", "simulate", str(tiny_sites), "--rounds", "2", "--iterations", "5", "--workers", "0",
                "-o", str(flower_dir), "--resume", "-q"]) == 0
    assert (flower_dir / "round_002" / "aggregate.json").stat().st_mtime_ns == stamp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_federation(tiny_sites: Path, tmp_path: Path, serve_security: list[str],
                         join_security: Callable[[str], list[str]], rounds: int = 2) -> Path:
    """`fedseg flower serve` + two `fedseg flower join` on 127.0.0.1; returns the run folder."""
    sites = tmp_path / "sites"
    for site in ("site_a", "site_b"):
        shutil.copytree(tiny_sites / site, sites / site)
    fedseg = [sys.executable, "-m", "fedseg.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    link = _free_port()
    serve = subprocess.Popen(
        [*fedseg, "flower", "serve", "-o", str(tmp_path / "run"), "--sites", "2", "--rounds", str(rounds),
         "--iterations", "3", *serve_security, "--host", "127.0.0.1", "--port", str(link),
         "--flwr-home", str(tmp_path / "home_link"), "--wait", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    joins = [
        subprocess.Popen(
            [*fedseg, "flower", "join", "--site", site, "--data", str(sites / site), "--superlink", f"127.0.0.1:{link}",
             *join_security(site), "--port", str(_free_port()), "--workers", "0", "--state", str(tmp_path / "state" / site),
             "--flwr-home", str(tmp_path / f"home_{site}")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        for site in ("site_a", "site_b")
    ]
    try:
        out, _ = serve.communicate(timeout=500)
        assert serve.returncode == 0, out[-3000:]
    finally:
        for process in (serve, *joins):   # each started in its own session: stop it and its children
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in (serve, *joins):
            try:
                process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    run_dir = tmp_path / "run"
    for r in range(1, rounds + 1):
        assert (run_dir / f"round_{r:03d}" / "aggregate.json").is_file()
    assert (run_dir / f"round_{rounds:03d}" / "models" / "global.safetensors").is_file()
    assert (run_dir / "report" / "metrics.json").is_file()
    return run_dir


@pytest.mark.slow
def test_superlink_and_two_supernodes_on_loopback(tiny_sites: Path, tmp_path: Path) -> None:
    """`fedseg flower serve` + two `fedseg flower join`, insecure loopback, 2 rounds."""
    _loopback_federation(tiny_sites, tmp_path, ["--insecure"], lambda site: ["--insecure"])


@pytest.mark.slow
def test_signed_federation_over_tls_on_loopback(tiny_sites: Path, tmp_path: Path) -> None:
    """Certificates from `fedseg flower certs`, keys from `fedseg keygen`: a round over TLS, every file signed."""
    import json

    tls, keys = tmp_path / "tls", tmp_path / "keys"
    assert cli(["flower", "certs", "-o", str(tls), "--host", "127.0.0.1", "-q"]) == 0
    for signer in ("coordinator", "site_a", "site_b"):
        assert cli(["keygen", "--site", signer, "-o", str(keys), "-q"]) == 0
    run_dir = _loopback_federation(
        tiny_sites, tmp_path,
        ["--ssl-certfile", str(tls / "server.pem"), "--ssl-keyfile", str(tls / "server.key"),
         "--ssl-ca-certfile", str(tls / "ca.pem"), "--keys", str(keys), "--key", str(keys / "coordinator.key")],
        lambda site: ["--root-certificates", str(tls / "ca.pem"), "--key", str(keys / f"{site}.key")],
        rounds=1,
    )
    plans = json.loads((run_dir / "plans.json").read_text())
    assert sorted(plans["keys"]) == ["coordinator", "site_a", "site_b"]
    record = json.loads((run_dir / "round_001" / "aggregate.json").read_text())
    assert record["signed_by"] == "coordinator"
    for site in ("site_a", "site_b"):   # what the sites sent is signed, and what they load next
        assert (run_dir / "round_001" / "updates" / f"{site}.safetensors.sig").is_file()
        assert (run_dir / "round_001" / f"{site}.safetensors.sig").is_file()

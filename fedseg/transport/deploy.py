"""`fedseg flower serve` / `fedseg flower join`: a real deployment on Flower's SuperLink and SuperNodes.

- `serve` (coordinator): starts `flower-superlink`, submits the fedseg app as one Flower run
  (`flwr run`, the app folder written to RUN_DIR/flower/app), streams its log until the run
  ends, then stops the SuperLink. The ServerApp that Flower starts writes RUN_DIR exactly as
  `fedseg simulate` does; started again with the same options it resumes after the last
  complete round.
- `join` (each site): runs `flower-supernode` in the foreground with the site's name, data
  folder and state folder as its node config; the ClientApp reads them from there.

In flwr 1.41 the Fleet, Control and runtime APIs are protobuf over HTTP on one port of the
SuperLink; fedseg's payloads travel as Arrays that Flower cuts into 5 MiB objects, so no
message size limit needs raising (see fedseg.transport.apps). TLS: the SuperLink takes a
certificate, key and CA certificate; a SuperNode and the submitting CLI take the CA
certificate. Plain HTTP only with an explicit `insecure`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedseg.atomic import write_text_atomic
from fedseg.errors import InputError
from fedseg.transport.coordinator import CoordinatorSettings
from fedseg.transport.site import SiteSettings

APP_MODULE = "fedseg_flower_app"
CONNECTION = "fedseg"


@dataclass
class Tls:
    """TLS material; `insecure` (plain HTTP) must be asked for explicitly."""

    insecure: bool = False
    certfile: Path | None = None        # the SuperLink's certificate (serve)
    keyfile: Path | None = None         # the SuperLink's private key (serve)
    ca_certfile: Path | None = None     # the CA that signed the SuperLink's certificate (serve and join)

    def check(self, serving: bool) -> None:
        if self.insecure:
            return
        needed = {"--ssl-certfile": self.certfile, "--ssl-keyfile": self.keyfile} if serving else {}
        needed["--ssl-ca-certfile" if serving else "--root-certificates"] = self.ca_certfile
        missing = [flag for flag, value in needed.items() if value is None]
        if missing:
            raise InputError(f"TLS needs {', '.join(missing)} (or --insecure for plain HTTP, e.g. on loopback)")
        for value in needed.values():
            if not Path(value).is_file():
                raise InputError("TLS file not found", value)


def flower_executable(name: str) -> str:
    """A Flower command from this Python environment (then PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise InputError(f"`{name}` not found; install Flower in this environment: pip install 'flwr[simulation]>=1.41,<1.42'")
    return found


def child_env(flwr_home: Path | None) -> dict[str, str]:
    """Environment for Flower's processes: this environment's commands first on PATH (Flower starts
    `flwr-serverapp` / `flwr-clientapp` by name), FLWR_HOME where Flower keeps installed apps."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def _toml_value(value: object) -> str:
    # JSON strings, numbers and booleans are valid TOML values
    return json.dumps(value)


def write_app_folder(folder: Path, settings: CoordinatorSettings, n_sites: int, wait_s: float) -> Path:
    """The Flower app (FAB source) that runs fedseg's ServerApp/ClientApp with these settings."""
    config = {
        "run-dir": str(Path(settings.run_dir).resolve()), "strategy": settings.strategy, "rounds": settings.rounds,
        "configuration": settings.configuration, "iterations": settings.iterations or 0,
        "set": json.dumps(settings.overrides, sort_keys=True), "seed": settings.seed,
        "keys": str(Path(settings.keys).resolve()) if settings.keys else "",
        "key": str(Path(settings.key).resolve()) if settings.key else "",
        "sites": n_sites, "wait": float(wait_s), "round-timeout": float(settings.round_timeout or 0),
    }
    lines = [
        "[project]", 'name = "fedseg-federation"', 'version = "1.0.0"',
        'description = "A fedseg federation (written by fedseg flower serve)"', 'license = "Apache-2.0"',
        "dependencies = []", "", "[tool.flwr.app]", 'publisher = "fedseg"', "",
        "[tool.flwr.app.components]", f'serverapp = "{APP_MODULE}:server_app"', f'clientapp = "{APP_MODULE}:client_app"',
        "", "[tool.flwr.app.config]", *(f"{key} = {_toml_value(value)}" for key, value in config.items()),
    ]
    write_text_atomic(folder / "pyproject.toml", "\n".join(lines) + "\n")
    # Flower imports the components from the app folder; fedseg itself comes from the environment.
    # (Flower checks the names by reading this file, so they are assigned here, not just imported.)
    write_text_atomic(folder / f"{APP_MODULE}.py", (
        '"""fedseg\'s Flower apps."""\n\nfrom fedseg.transport import apps\n\n'
        'server_app = apps.server_app\nclient_app = apps.client_app\n'
    ))
    return folder


def superlink_command(host: str, port: int, tls: Tls) -> list[str]:
    command = [flower_executable("flower-superlink"), "--host", host, "--port", str(port),
               # the app is fedseg, already installed: never install anything at run time
               "--disable-runtime-dependency-installation"]
    if tls.insecure:
        command.append("--insecure")
    else:
        command += ["--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile),
                    "--ssl-ca-certfile", str(tls.ca_certfile)]
    return command


def supernode_command(superlink: str, site: SiteSettings, port: int, tls: Tls) -> list[str]:
    node = {"site": site.site, "data": str(Path(site.data).resolve()), "state": str(Path(site.state).resolve()),
            "device": site.device, "workers": site.workers}
    if site.key is not None:
        node["key"] = str(Path(site.key).resolve())
    if site.plan_id:
        node["plan-id"] = site.plan_id
    for key, value in node.items():
        if isinstance(value, str) and ('"' in value or "'" in value):
            raise InputError(f"--{key} must not contain quotes (Flower's --node-config cannot carry them): {value}")
    command = [flower_executable("flower-supernode"), "--superlink", superlink, "--port", str(port),
               "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node.items())]
    command += ["--insecure"] if tls.insecure else ["--root-certificates", str(tls.ca_certfile)]
    return command


def write_cli_config(flwr_home: Path, address: str, tls: Tls) -> Path:
    """FLWR_HOME/config.toml naming the SuperLink connection `flwr run` submits to."""
    security = "insecure = true" if tls.insecure else f"root-certificates = {_toml_value(str(Path(tls.ca_certfile).resolve()))}"
    text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    write_text_atomic(flwr_home / "config.toml", text)
    return flwr_home


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InputError(f"flower-superlink exited with code {process.returncode}", log_path)
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise InputError(f"flower-superlink did not listen on {host}:{port} within {timeout_s:.0f}s", log_path)


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM (Flower shuts down cleanly on it), SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve(
    settings: CoordinatorSettings,
    n_sites: int,
    *,
    host: str = "0.0.0.0",
    port: int = 9092,
    tls: Tls,
    wait_s: float = 600.0,
    flwr_home: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Run the federation from a SuperLink started here; returns the run's report folder."""
    tls.check(serving=True)
    run_dir = Path(settings.run_dir)
    flower_dir = run_dir / "flower"
    app = write_app_folder(flower_dir / "app", settings, n_sites, wait_s)
    cli_home = write_cli_config(flower_dir / "cli", f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else f"{host}:{port}", tls)
    env = child_env(flwr_home)
    started = time.time()
    superlink_log = flower_dir / "superlink.log"
    with open(superlink_log, "ab") as out:
        superlink = subprocess.Popen(superlink_command(host, port, tls), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, superlink, 60.0, superlink_log)
        log(f"SuperLink listening on {host}:{port} (log: {superlink_log}); waiting for {n_sites} site(s)")
        submit = [flower_executable("flwr"), "run", str(app), CONNECTION, "--stream"]
        with subprocess.Popen(submit, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "FLWR_HOME": str(cli_home.resolve())}) as run:
            assert run.stdout is not None
            for line in run.stdout:
                log(line.rstrip())
        if run.returncode != 0:
            raise InputError(f"submitting the run to the SuperLink failed (flwr run exited {run.returncode})", superlink_log)
    finally:
        stop(superlink)
    report = run_dir / "report" / "metrics.json"
    if not report.is_file() or report.stat().st_mtime < started:
        raise InputError("the federation did not complete (see the log above and the SuperLink log)", superlink_log)
    return report.parent


def join(site: SiteSettings, superlink: str, *, tls: Tls, port: int = 9094, flwr_home: Path | None = None) -> int:
    """Run this site's SuperNode until it is stopped; returns its exit code."""
    tls.check(serving=False)
    if not Path(site.data).is_dir():
        raise InputError("site data folder not found", site.data)
    Path(site.state).mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(supernode_command(superlink, site, port, tls), env=child_env(flwr_home))
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop(process)
        return 130

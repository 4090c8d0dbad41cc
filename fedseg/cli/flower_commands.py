"""`fedseg flower simulate | serve | join | certs`: the same federation over Flower (needs the `flower` extra).

flwr is imported only inside the commands, so `fedseg --help` stays fast and works without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from fedseg.cli.options import (
    BUDGET, CONFIGURATION, DEVICE, ITERATIONS, JSON, PRECISION, QUIET, RESUME, ROUNDS, RUN_OUTPUT, SEED, SET, SITES_ROOT,
    STRATEGY, WORKERS, parse_set_options, require_dir, require_output_dir,
)
from fedseg.errors import InputError

# fedseg is installed from its source folder, not from a package index, so `pip install
# 'fedseg[flower]'` finds nothing: the hint installs the extra's requirement itself (kept equal
# to pyproject.toml's `flower` extra by a test), which works from any folder.
FLOWER_REQUIREMENT = "flwr[simulation]>=1.41,<1.42"
INSTALL_HINT = f"pip install '{FLOWER_REQUIREMENT}' (or, in the fedseg source folder: pip install -e '.[flower]')"

flower_app = typer.Typer(
    help="Run the federation over Flower: on one machine (simulate), or with a SuperLink (serve) "
    f"and one SuperNode per site (join). Needs the optional extra: {INSTALL_HINT}",
    no_args_is_help=True,
    rich_markup_mode=None,
)


ROUND_TIMEOUT = typer.Option(
    None, "--round-timeout", min=1,
    help="Seconds a round waits for the sites' updates; a site that fails or is late is left out of "
    "the round (recorded) when the plan's quorum holds (--set min_sites=N; default every site).",
)


def require_flower(simulation: bool = False) -> None:
    """One-line InputError (exit 2) when Flower (or its simulation engine, Ray) is missing."""
    missing = [name for name in (("flwr", "ray") if simulation else ("flwr",)) if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"{' and '.join(missing)} not installed; install Flower support with: {INSTALL_HINT}")


def _quiet_flower(verbose: bool) -> None:
    # Flower logs every message exchange at INFO and warns that its Python simulation entry
    # point is deprecated; fedseg prints its own progress.
    import logging

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)


def _tls(insecure: bool, certfile: Path | None, keyfile: Path | None, ca_certfile: Path | None):
    from fedseg.transport.deploy import Tls

    return Tls(insecure=insecure, certfile=certfile, keyfile=keyfile, ca_certfile=ca_certfile)


@flower_app.command("simulate")
def simulate(
    sites_root: Path = SITES_ROOT,
    strategy: str = STRATEGY,
    rounds: int = ROUNDS,
    output: Path = RUN_OUTPUT,
    config: str = CONFIGURATION,
    iterations: int = ITERATIONS,
    set_: list[str] = SET,
    seed: int = SEED,
    workers: int = WORKERS,
    device: str = DEVICE,
    precision: str = PRECISION,
    budget: float = BUDGET,
    mirror: bool = typer.Option(False, "--mirror/--no-mirror", help="Mirroring at test time (server test set)."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Sites training at the same time (Ray actors)."),
    cpus_per_site: int = typer.Option(1, "--cpus-per-site", min=1, help="CPU threads each training site may use."),
    round_timeout: float = ROUND_TIMEOUT,
    resume: bool = RESUME,
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's own log lines."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """The federation of `fedseg simulate`, through Flower's Simulation Runtime (Ray) on one machine.

    The coordinator is a Flower ServerApp, each site a ClientApp; they exchange fedseg's weight
    files as bytes, and the coordinator aggregates them with the same engine as `fedseg aggregate`.
    Writes the same run folder and report as `fedseg simulate`.

    Example: fedseg flower simulate sites --strategy fedavg --rounds 3 -o run_flower
    """
    require_flower(simulation=True)
    from fedseg.cli.console import Reporter, print_json
    from fedseg.cli.simulate_command import print_dice_table
    from fedseg.federation.run_folder import check_run_folder
    from fedseg.federation.run_setup import check_overrides
    from fedseg.federation.single_machine import result_to_dict, SimulationConfig
    from fedseg.training.device import check_precision, resolve_device
    from fedseg.transport.flower_simulation import flower_simulate

    require_output_dir(output, "run folder")
    check_run_folder(output, resume)
    require_dir(sites_root, "sites folder")
    overrides = parse_set_options(set_)
    check_overrides(strategy, overrides)
    _quiet_flower(verbose)
    reporter = Reporter(quiet=quiet)
    cfg = SimulationConfig(
        sites_root=sites_root, strategy=strategy, rounds=rounds, run_dir=output, configuration=config,
        iterations=iterations, overrides=overrides, seed=seed, workers=workers, device=resolve_device(device),
        precision=check_precision(precision), mirror=mirror, budget=budget,
    )
    result = flower_simulate(cfg, parallel=parallel, cpus_per_site=cpus_per_site, log=reporter.log,
                             round_timeout=round_timeout, verbose=verbose)
    if as_json:
        print_json(result_to_dict(result))
    elif not quiet:
        print_dice_table(result)


@flower_app.command("serve")
def serve(
    output: Path = RUN_OUTPUT,
    sites: int = typer.Option(..., "--sites", min=1, help="Number of sites to wait for before planning."),
    strategy: str = STRATEGY,
    rounds: int = ROUNDS,
    config: str = CONFIGURATION,
    iterations: int = ITERATIONS,
    set_: list[str] = SET,
    seed: int = SEED,
    budget: float = BUDGET,
    keys: Path = typer.Option(None, "--keys", help="Folder of <site>.pub and coordinator.pub: every file must then be signed."),
    key: Path = typer.Option(None, "--key", help="The coordinator's private key (with --keys)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address the SuperLink listens on."),
    port: int = typer.Option(9092, "--port", help="Port of the SuperLink (Fleet, Control and runtime APIs)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP without TLS (loopback and tests only)."),
    ssl_certfile: Path = typer.Option(None, "--ssl-certfile", help="The SuperLink's TLS certificate (PEM)."),
    ssl_keyfile: Path = typer.Option(None, "--ssl-keyfile", help="The SuperLink's TLS private key (PEM)."),
    ssl_ca_certfile: Path = typer.Option(None, "--ssl-ca-certfile", help="The CA certificate that signed it (PEM)."),
    wait: float = typer.Option(600.0, "--wait", min=1, help="Seconds to wait for the sites to connect."),
    flwr_home: Path = typer.Option(None, "--flwr-home", help="Folder where Flower keeps installed apps (default ~/.flwr)."),
    round_timeout: float = ROUND_TIMEOUT,
    resume: bool = RESUME,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Coordinate a federation: start a Flower SuperLink and run fedseg's ServerApp on it.

    Waits for --sites SuperNodes (`fedseg flower join`), plans from their fingerprints, runs
    the rounds, has every site evaluate the final model, writes OUTPUT as `fedseg simulate`
    does, then stops the SuperLink. With --resume, complete rounds in OUTPUT are skipped.

    Example: fedseg flower serve -o run --sites 3 --strategy fedavg --rounds 3 --ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.pem
    """
    require_flower()
    from fedseg.cli.console import Reporter
    from fedseg.federation.run_folder import check_run_folder
    from fedseg.federation.run_setup import check_overrides
    from fedseg.transport.coordinator import CoordinatorSettings
    from fedseg.transport.deploy import serve as run_serve

    require_output_dir(output, "run folder")
    check_run_folder(output, resume)
    if (keys is None) != (key is None):
        raise InputError("--keys and --key go together (public keys for the plan, the coordinator's private key)")
    overrides = parse_set_options(set_)
    check_overrides(strategy, overrides)   # before waiting for the sites, not after they have joined
    reporter = Reporter(quiet=quiet)
    settings = CoordinatorSettings(
        run_dir=output, strategy=strategy, rounds=rounds, configuration=config, iterations=iterations,
        overrides=overrides, seed=seed, keys=keys, key=key, budget=budget, round_timeout=round_timeout,
    )
    report = run_serve(settings, sites, host=host, port=port, tls=_tls(insecure, ssl_certfile, ssl_keyfile, ssl_ca_certfile),
                       wait_s=wait, flwr_home=flwr_home, log=reporter.log)
    reporter.log(f"federation complete; report in {report}")
    if as_json:
        from fedseg.cli.console import print_json
        from fedseg.federation.run_status import run_status

        print_json(run_status(output).to_dict())


@flower_app.command("join")
def join(
    site: str = typer.Option(..., "--site", help="This site's name."),
    data: Path = typer.Option(..., "--data", help="This site's nnU-Net raw folder (dataset.json, imagesTr, ...)."),
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's SuperLink as host:port."),
    state: Path = typer.Option(None, "--state", help="State folder kept between rounds (default: ./fedseg_state/<site>)."),
    key: Path = typer.Option(None, "--key", help="This site's private key, when the plan requires signed files."),
    plan_id: str = typer.Option(None, "--plan-id", help="Only train under this plan (plan_id from plans.json)."),
    device: str = DEVICE,
    precision: str = PRECISION,
    workers: int = typer.Option(2, "--workers", min=0, help="Background augmentation workers."),
    port: int = typer.Option(9094, "--port", help="Local port of the SuperNode's runtime API (one per SuperNode on a machine)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP without TLS (loopback and tests only)."),
    root_certificates: Path = typer.Option(None, "--root-certificates", help="CA certificate (PEM) that signed the SuperLink's certificate."),
    flwr_home: Path = typer.Option(None, "--flwr-home", help="Folder where Flower keeps installed apps (default ~/.flwr)."),
) -> None:
    """Take part in a federation as site SITE: run a Flower SuperNode until it is stopped.

    Images never leave DATA: the site sends its fingerprint (summary statistics) and its
    weight updates; its local parameters and training state stay in --state.

    Example: fedseg flower join --site site_a --data sites/site_a --superlink coordinator.example.org:9092 --root-certificates ca.pem
    """
    require_flower()
    from fedseg.training.device import check_device_name, check_precision
    from fedseg.transport.deploy import join as run_join
    from fedseg.transport.site import SiteSettings

    require_dir(data, "site data folder")
    if state is not None:
        require_output_dir(state, "state folder")
    # "auto" is resolved where the site trains (a SuperNode's GPU is its own); the name is checked now
    check_device_name(device)
    check_precision(precision)
    settings = SiteSettings(
        site=site, data=data, state=state if state is not None else Path("fedseg_state") / site, key=key,
        device=device, precision=precision, workers=workers, plan_id=plan_id,
    )
    code = run_join(settings, superlink, tls=_tls(insecure, None, None, root_certificates), port=port, flwr_home=flwr_home)
    if code:
        raise typer.Exit(code)


@flower_app.command("certs")
def certs(
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write ca.pem, ca.key, server.pem, server.key into."),
    hosts: list[str] = typer.Option(None, "--host", help="Host name or IP address the sites use to reach the SuperLink (repeat; default localhost and 127.0.0.1)."),
    days: int = typer.Option(730, "--days", min=1, help="Validity of the certificates in days."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Make TLS certificates for a deployment: a private CA and a SuperLink certificate it signs.

    Give the SuperLink server.pem, server.key and ca.pem (flower serve --ssl-certfile
    --ssl-keyfile --ssl-ca-certfile); give every site ca.pem (flower join --root-certificates).
    ca.key stays with you. Existing files are never overwritten. Needs no Flower.

    Example: fedseg flower certs -o tls --host coordinator.example.org --host 10.0.0.5
    """
    from fedseg.cli.console import Reporter, print_json
    from fedseg.transport.certs import DEFAULT_HOSTS, make_certificates

    files = make_certificates(output, hosts or DEFAULT_HOSTS, days=days)
    Reporter(quiet=quiet).log(
        f"wrote {files.ca_cert}, {files.server_cert} (for {', '.join(files.hosts)}) and their keys under {output}; "
        f"give every site {files.ca_cert.name}, keep {files.ca_key.name} private"
    )
    if as_json:
        print_json({name: str(getattr(files, name)) for name in ("ca_cert", "ca_key", "server_cert", "server_key")}
                   | {"hosts": files.hosts})


def register(app: typer.Typer) -> None:
    app.add_typer(flower_app, name="flower")

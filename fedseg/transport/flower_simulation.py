"""`fedseg flower simulate`: the federation through Flower's Simulation Runtime on one machine.

The ServerApp (coordinator) runs in this process and writes the run folder; each site's
ClientApp runs in a Ray actor of Flower's simulation backend (flwr 1.41 has no other backend),
on virtual SuperNode `partition-id` = index of the site in name order. Site state folders are
RUN_DIR/state/<site>, as in `fedseg simulate`, so both runs start every round from the same
files and train the same way.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from fedseg.federation.run_folder import discover_sites, round_dir
from fedseg.federation.server_eval import SERVER_TEST_DIR, evaluate_server_models, is_server_test_set
from fedseg.federation.single_machine import SimulationConfig, SimulationResult
from fedseg.planning.plans import load_plans
from fedseg.transport.apps import make_client_app, make_server_app
from fedseg.transport.coordinator import CoordinatorSettings
from fedseg.transport.site import SiteSettings


def flower_simulate(
    config: SimulationConfig,
    parallel: int = 1,
    cpus_per_site: int = 1,
    log: Callable[[str], None] = lambda message: None,
    round_timeout: float | None = None,
    verbose: bool = False,
) -> SimulationResult:
    """Run `config` through Flower's simulation engine; the same run folder and result as `simulate`.

    `parallel`: sites that train at the same time (Ray actors); `cpus_per_site`: CPU threads
    each of them may use; `round_timeout`: seconds a round waits for the sites (a site that
    fails or is late is left out while the plan's quorum holds). Flower's and Ray's own log
    lines (per-message INFO, the notice that this Python entry point is deprecated, Ray's tips,
    actors' lines with colour codes) are shown only with `verbose`: fedseg logs its progress.
    """
    from flwr.simulation import run_simulation  # lazily: it starts Ray, needed only once a simulation runs

    run_dir = Path(config.run_dir)
    sites = [
        SiteSettings(site=path.name, data=path.resolve(), state=(run_dir / "state" / path.name).resolve(),
                     device=config.device, precision=config.precision, workers=config.workers)
        for path in discover_sites(Path(config.sites_root), log)
    ]
    settings = CoordinatorSettings(
        run_dir=run_dir, strategy=config.strategy, rounds=config.rounds, configuration=config.configuration,
        iterations=config.iterations, overrides=dict(config.overrides), seed=config.seed, round_timeout=round_timeout,
        budget=config.budget,
    )
    results: list[SimulationResult] = []
    # at most two models per training actor out at once (one training, one queued behind it),
    # so the coordinator's memory does not grow with the number of sites
    server_app = make_server_app(settings, n_sites=len(sites), wait_s=60.0, log=log, results=results,
                                 window=2 * parallel)
    client_app = make_client_app(lambda context: sites[int(context.node_config["partition-id"])])
    with flower_logs(verbose):
        run_simulation(server_app, client_app, num_supernodes=len(sites),
                       backend_config=ray_backend_config(parallel, cpus_per_site, config.device, verbose))
    if not results:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    result = results[0]
    # the server models on SITES_ROOT/_server_test, as `fedseg simulate` does (one machine: the
    # coordinator can read that folder)
    server_dir = Path(config.sites_root) / SERVER_TEST_DIR
    if is_server_test_set(server_dir):
        result.server_metrics = evaluate_server_models(
            load_plans(run_dir / "plans.json"), round_dir(run_dir, config.rounds), server_dir, Path(result.report_dir),
            state_root=run_dir / "state", device=config.device, mirror=config.mirror,
        )
    return result


# Ray's shared-memory object store carries every message between the coordinator and the
# actors. Ray sizes it at 30% of the machine's memory, and the pages a message passed through
# stay mapped in the actor, so without a cap its resident memory grows by ~7 MB per tiny site
# until that 30%. Capped, the store reuses its pages (a larger object spills to disk, slower but
# still correct): 512 MiB holds the few models in flight per training actor (`window`), even
# for a 3D network of ~120 MB.
OBJECT_STORE_BYTES_PER_ACTOR = 512 * 2**20


def ray_backend_config(parallel: int, cpus_per_site: int, device: str, verbose: bool) -> dict:
    """Flower's backend config for `parallel` Ray actors of `cpus_per_site` CPUs each.

    Ray gets exactly parallel x cpus_per_site CPUs (it sets each actor's OMP_NUM_THREADS to its
    share, so the machine is not oversubscribed), a GPU share per actor on CUDA, and an object
    store of OBJECT_STORE_BYTES_PER_ACTOR per actor.
    """
    gpus = 1.0 / parallel if device.startswith("cuda") else 0.0
    return {
        # log_to_driver: the actors' own log lines (with terminal colour codes) reach this
        # process only when asked for; a failing site still comes back as a failed reply
        "init_args": {"num_cpus": parallel * cpus_per_site, "num_gpus": 1 if gpus else 0, "log_to_driver": verbose,
                      "object_store_memory": parallel * OBJECT_STORE_BYTES_PER_ACTOR},
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus},
    }


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def flower_logs(verbose: bool) -> Iterator[None]:
    """Within the block, Flower's logger passes only errors and Python warnings raised by Ray are
    ignored, unless `verbose`. A filter on the logger, not a level: Flower resets its levels and
    handlers when a simulation starts."""
    if verbose:
        yield
        return
    logger = logging.getLogger("flwr")
    quiet = _ErrorsOnly()
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
            yield
    finally:
        logger.removeFilter(quiet)

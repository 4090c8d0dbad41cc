"""`fedseg flower simulate`'s Ray resources: what keeps a small machine from being oversubscribed
and Ray's memory from growing with the number of sites."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from fedseg.transport.flower_simulation import OBJECT_STORE_BYTES_PER_ACTOR, ray_backend_config  # noqa: E402


@pytest.mark.parametrize("parallel,cpus_per_site", [(1, 1), (2, 1), (2, 3)])
def test_ray_gets_exactly_the_cpus_of_the_training_actors(parallel: int, cpus_per_site: int) -> None:
    config = ray_backend_config(parallel, cpus_per_site, "cpu", verbose=False)
    # Ray fits int(num_cpus / client num_cpus) actors: exactly `parallel`, each with its share of threads
    assert config["init_args"]["num_cpus"] == parallel * cpus_per_site
    assert config["client_resources"] == {"num_cpus": cpus_per_site, "num_gpus": 0.0}
    assert config["init_args"]["num_gpus"] == 0
    # the object store is capped per actor, not left at Ray's 30% of the machine's memory
    assert config["init_args"]["object_store_memory"] == parallel * OBJECT_STORE_BYTES_PER_ACTOR
    assert config["init_args"]["log_to_driver"] is False


def test_actors_share_the_gpu_on_cuda() -> None:
    config = ray_backend_config(4, 1, "cuda:0", verbose=True)
    assert config["client_resources"]["num_gpus"] == 0.25 and config["init_args"]["num_gpus"] == 1
    assert config["init_args"]["log_to_driver"] is True

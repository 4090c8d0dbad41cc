"""Secure aggregation through real training: same seed and data, the masked round equals the plain one."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.run_folder import discover_sites, round_dir
from fedseg.federation.run_setup import agreement_key, plan_and_init
from fedseg.federation.site_training import run_site_round
from fedseg.federation.weightfile import read_weight_file
from fedseg.planning.fingerprint import compute_fingerprint
from fedseg.data.dataset import load_dataset


def first_round(sites_root: Path, run_dir: Path, overrides: dict[str, str]) -> dict[str, np.ndarray]:
    sites = {p.name: p for p in discover_sites(sites_root)}
    fingerprints = [compute_fingerprint(load_dataset(path), name) for name, path in sites.items()]
    plans = plan_and_init(run_dir, fingerprints, strategy="fedavg", rounds=1, configuration="3d_fullres",
                          iterations=2, overrides=overrides, seed=7)
    updates = []
    for name, path in sites.items():
        update = round_dir(run_dir, 1) / "updates" / f"{name}.safetensors"
        run_site_round(plans, name, path, round_dir(run_dir, 0) / f"{name}.safetensors", run_dir / "state" / name, update,
                       iterations=2, num_workers=0, agreement_key=agreement_key(run_dir, plans, name))
        updates.append(update)
    aggregate_round(plans, updates, round_dir(run_dir, 1))
    return read_weight_file(round_dir(run_dir, 1) / "models" / "global.safetensors")[0]


@pytest.mark.slow
def test_trained_round_with_secure_aggregation_equals_the_plain_one(tiny_sites: Path, tmp_path: Path) -> None:
    plain = first_round(tiny_sites, tmp_path / "plain", {})
    secure = first_round(tiny_sites, tmp_path / "secure", {"secure_aggregation": "true"})
    assert (tmp_path / "secure" / "keys").is_dir()
    masked = read_weight_file(tmp_path / "secure" / "round_001" / "updates" / "site_a.safetensors")[0]
    assert all(a.dtype == np.uint64 for a in masked.values())
    diff = math.sqrt(sum(float(np.sum((secure[k].astype(np.float64) - plain[k]) ** 2)) for k in plain))
    size = math.sqrt(sum(float(np.sum(plain[k].astype(np.float64) ** 2)) for k in plain))
    assert diff / size <= 1e-5

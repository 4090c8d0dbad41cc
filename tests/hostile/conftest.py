"""Fixtures of the hostile-input batteries: the tiny sites' fingerprints and a plan, made once
per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.cli.main import run


@pytest.fixture(scope="session")
def tiny_fingerprints(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedseg.data.dataset import load_dataset
    from fedseg.planning.fingerprint import compute_fingerprint, save_fingerprint

    folder = tmp_path_factory.mktemp("fingerprints")
    paths = []
    for site_dir in sorted(p for p in tiny_sites.iterdir() if p.is_dir()):
        path = folder / f"{site_dir.name}.json"
        save_fingerprint(compute_fingerprint(load_dataset(site_dir), site_dir.name), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_plans(tiny_fingerprints: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fedavg plan of the tiny sites with a small patch (cheap networks)."""
    path = tmp_path_factory.mktemp("plan") / "plans.json"
    argv = ["plan", *map(str, tiny_fingerprints), "-o", str(path), "--set", "configuration.patch_size=16,16,16", "-q"]
    assert run(argv) == 0
    return path

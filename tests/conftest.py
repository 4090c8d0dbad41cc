"""Shared fixtures: synthetic sites generated once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sites (preset `tiny`). Read-only: copy before modifying."""
    from fedseg.synth import generate

    root = tmp_path_factory.mktemp("tiny_sites")
    generate(root, preset="tiny", seed=0)
    return root


@pytest.fixture
def tiny_sites_copy(tiny_sites: Path, tmp_path: Path) -> Path:
    target = tmp_path / "sites"
    shutil.copytree(tiny_sites, target)
    return target

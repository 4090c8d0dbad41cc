"""What the hostile-input batteries of the command line share: tiny fingerprints and a plan
made once per session, and the contract every refusal keeps (exit 2, one line naming the
culprit, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.cli.main import run


def listing(root: Path) -> set[str]:
    """Every path under `root` (relative), to show that a refused command wrote nothing."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(argv: list[str], capsys: pytest.CaptureFixture, *named: str) -> str:
    """Run the CLI and check the refusal contract; returns the error line."""
    capsys.readouterr()
    rc = run(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit {rc} for {argv}: {err}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedseg: error: "), err
    for name in named:
        assert name in err, f"{name!r} not named in: {err}"
    return err


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

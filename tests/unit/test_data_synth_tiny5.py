"""Preset tiny5: five sites, the first three exactly tiny's."""

from __future__ import annotations

from pathlib import Path

from fedseg.data.dataset import load_dataset
from fedseg.synth import PRESETS, generate


def test_tiny5_has_five_sites_extending_tiny(tmp_path: Path, tiny_sites: Path) -> None:
    assert PRESETS["tiny5"].sites == ("site_a", "site_b", "site_c", "site_d", "site_e")
    dirs = generate(tmp_path, preset="tiny5", seed=0)
    assert [d.name for d in dirs] == list(PRESETS["tiny5"].sites)
    for d in dirs:
        assert len(load_dataset(d).cases("Tr")) == 8
    for name in ("site_a", "site_c"):
        for path in sorted((tiny_sites / name / "labelsTr").iterdir())[:2]:
            assert (tmp_path / name / "labelsTr" / path.name).read_bytes() == path.read_bytes()

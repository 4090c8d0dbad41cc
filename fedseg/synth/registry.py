"""Synthetic multi-site federations for demos and tests, written as nnU-Net raw folders.

Each preset describes a set of sites; for each site it yields cases (images, label,
geometry). `generate` writes `out_dir/<site>/` with dataset.json, imagesTr, labelsTr,
imagesTs, labelsTs. Sites differ the way real hospitals do: voxel spacing, intensity scale
and offset, noise, so federated planning and normalisation have something to reconcile.

The registry (this module) imports the preset modules (the package fedseg.synth.presets);
they import only `fedseg.synth.common` (and `tiny` for `tiny5`), never this module, so there
is no import cycle.

Adding a preset: write a module in fedseg/synth/presets/ with a function `(site: str,
site_index: int, seed: int) -> SyntheticSite` (build it from `fedseg.synth.common`) and
register it in `PRESETS` below with its site names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedseg.errors import InputError
from fedseg.synth.common import SiteGenerator, write_site
from fedseg.synth.presets import brain, fedfms, fednnunet, flames, mixmfl, tiny, tiny5

Log = Callable[[str], None]


@dataclass(frozen=True)
class Preset:
    description: str
    sites: tuple[str, ...]
    make_site: SiteGenerator


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "3 sites, 3D ~30 mm volumes, a bright blob in a body; spacing and intensity differ per site",
        ("site_a", "site_b", "site_c"),
        tiny.tiny_site,
    ),
    "brain": Preset(
        "3 sites seeing nibabel's real T1 MRI through different simulated scanners; label = tissue mask",
        ("site_a", "site_b", "site_c"),
        brain.brain_site,
    ),
    "flames": Preset(flames.DESCRIPTION, flames.FLAMES_SITES, flames.flames_site),
    "fednnunet": Preset(fednnunet.DESCRIPTION, fednnunet.SITES, fednnunet.make_site),
    "mixmfl": Preset(mixmfl.DESCRIPTION, mixmfl.SITES, mixmfl.mixmfl_site),
    "tiny5": Preset(tiny5.DESCRIPTION, tiny5.SITES, tiny5.tiny5_site),
    "fedfms": Preset(fedfms.DESCRIPTION, fedfms.SITES, fedfms.make_fedfms_site),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def generate(out_dir: str | Path, preset: str = "tiny", seed: int = 0, log: Log | None = None) -> list[Path]:
    """Write every site of `preset` under `out_dir`; returns the site folders in order.

    Deterministic: the same preset and seed give the same voxels. Refuses to write into a
    site folder that already holds files, so existing data is never overwritten or mixed.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (available: {', '.join(sorted(PRESETS))})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output exists and is not a folder", out_dir)
    spec = PRESETS[preset]
    for site in spec.sites:
        site_dir = out_dir / site
        if site_dir.exists() and any(site_dir.iterdir()):
            raise InputError("site folder already exists and is not empty; choose a new output folder", site_dir)
    site_dirs = []
    for index, site in enumerate(spec.sites):
        site_dir = out_dir / site
        site_data = spec.make_site(site, index, seed)
        n_train, n_test = write_site(site_dir, site, site_data)
        if log is not None:
            log(f"{preset}: wrote {site} ({n_train} training, {n_test} test cases)")
        site_dirs.append(site_dir)
    return site_dirs

"""Synthetic presets: loadable nnU-Net raw folders, sites that differ, deterministic by seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedseg.data.case_loading import load_case
from fedseg.data.dataset import load_dataset
from fedseg.synth import PRESETS, generate
from fedseg.errors import InputError


def _digest(root: Path) -> str:
    """Hash of every voxel file's decoded content (gzip headers may carry timestamps)."""
    h = hashlib.sha256()
    for site in sorted(p for p in root.iterdir() if p.is_dir()):
        ds = load_dataset(site)
        for split in ("Tr", "Ts"):
            for case in ds.cases(split):
                data = load_case(case, ds.label_values)
                h.update(data.data.tobytes())
                h.update(data.seg.tobytes())
                h.update(repr(data.geometry).encode())
    return h.hexdigest()


def test_tiny_sites_load_and_differ(tiny_sites: Path) -> None:
    spacings, scales = [], []
    for site in ("site_a", "site_b", "site_c"):
        ds = load_dataset(tiny_sites / site)
        assert ds.labels == {"background": 0, "lesion": 1} and ds.n_channels == 1
        assert ds.file_ending == ".nii.gz" and ds.name == site
        train, test = ds.cases("Tr"), ds.cases("Ts")
        assert len(train) == ds.num_training == 8 and len(test) == 4
        assert all(c.label is not None for c in test)
        case = load_case(train[0], ds.label_values)
        assert all(12 <= s <= 34 for s in case.data.shape[1:])
        fg = case.seg > 0
        body = case.data[0] != 0
        assert 0.005 < fg.mean() < 0.3 and fg[~body].sum() == 0
        # The lesion is brighter than the surrounding tissue: the task is learnable.
        assert case.data[0][fg].mean() > case.data[0][body & ~fg].mean() * 1.2
        spacings.append(case.geometry.spacing)
        scales.append(float(np.median(case.data[0][body])))
    assert len({tuple(round(v, 2) for v in s) for s in spacings}) == 3
    assert max(scales) / min(scales) > 2


def test_deterministic_by_seed(tmp_path: Path, tiny_sites: Path) -> None:
    generate(tmp_path / "same", preset="tiny", seed=0)
    generate(tmp_path / "other", preset="tiny", seed=1)
    reference = _digest(tiny_sites)
    assert _digest(tmp_path / "same") == reference
    assert _digest(tmp_path / "other") != reference


def test_brain_preset(tmp_path: Path) -> None:
    messages: list[str] = []
    dirs = generate(tmp_path, preset="brain", seed=3, log=messages.append)
    assert [d.name for d in dirs] == ["site_a", "site_b", "site_c"] and len(messages) == 3
    medians = []
    for site_dir in dirs:
        ds = load_dataset(site_dir)
        assert ds.modality == "MRI" and ds.label_values == [0, 1]
        assert len(ds.cases("Tr")) == 6 and len(ds.cases("Ts")) == 3
        first, second = (load_case(c, ds.label_values) for c in ds.cases("Tr")[:2])
        assert 0.2 < (first.seg > 0).mean() < 0.9
        assert not np.array_equal(first.seg, second.seg)      # each case has its own pose
        medians.append(float(np.median(first.data[0][first.seg > 0])))
    assert max(medians) / min(medians) > 10                   # site-specific intensity scale


def test_unknown_preset_and_existing_output(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown preset"):
        generate(tmp_path, preset="nope")
    (tmp_path / "site_b").mkdir()
    (tmp_path / "site_b" / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not empty"):
        generate(tmp_path, preset="tiny")
    assert not (tmp_path / "site_a").exists()                 # checked before writing anything
    assert sorted(PRESETS) == ["brain", "tiny"] or {"brain", "tiny"} <= set(PRESETS)


def test_synth_help_lists_every_preset() -> None:
    from fedseg.cli.data_commands import synth

    listed = {line.strip()[2:].split(":")[0] for line in (synth.__doc__ or "").splitlines() if line.strip().startswith("- ")}
    assert listed == set(PRESETS)

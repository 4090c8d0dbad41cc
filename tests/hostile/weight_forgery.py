"""Forging hostile weight files for the hostile-input tests: a small federation of tiny
tensors, and byte-level edits of a safetensors file that fedseg's writer would never make."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedseg.federation.engine import aggregate_round, write_site_update
from fedseg.federation.weightfile import WeightMeta, read_weight_file, write_weight_file
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec

MANIFEST = {
    "encoder.stages.0.conv.weight": {"shape": [4, 1, 3, 3, 3], "dtype": "float32"},
    "encoder.stages.0.conv.bias": {"shape": [4], "dtype": "float32"},
    "decoder.seg_layers.0.weight": {"shape": [2, 4, 1, 1, 1], "dtype": "float32"},
    "norm.num_batches_tracked": {"shape": [], "dtype": "int64"},
}
N_CASES = {"A": 3, "B": 5, "C": 8}
GIB = 1 << 30


def make_plans(params: dict | None = None, manifest: dict | None = None, sites: dict[str, int] | None = None) -> Plans:
    network = NetworkSpec(
        n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]],
        n_conv_per_stage=[1, 1], n_conv_per_stage_decoder=[1],
    )
    config = ConfigurationPlan(
        name="3d_fullres", spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16], median_image_size_in_voxels=[16, 16, 16],
        batch_size=2, normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False], network=network,
    )
    return Plans(
        dataset_name="hostile", channel_names={"0": "T1"}, labels={"background": 0, "lesion": 1},
        file_ending=".nii.gz", fingerprint={},
        sites={s: SiteInfo("MRI", ["T1"], n) for s, n in (sites or N_CASES).items()},
        strategy=StrategySpec("fedavg", dict(params or {})), configurations={"3d_fullres": config},
        default_configuration="3d_fullres", extra={"manifests": {"3d_fullres": manifest or MANIFEST}},
    )


def site_state(seed: int, manifest: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(e["shape"]) if e["dtype"] == "float32" else np.full(e["shape"], seed)).astype(e["dtype"])
        for name, e in (manifest or MANIFEST).items()
    }


def write_updates(plans: Plans, folder: Path, round_index: int = 1, **meta: Any) -> dict[str, Path]:
    """One valid update per site under folder/updates/ (metadata overrides via `rewrite`)."""
    paths = {}
    for i, site in enumerate(sorted(plans.sites)):
        path = folder / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, site_state(i + 1, plans.extra["manifests"]["3d_fullres"]), path,
                          round_index=round_index, n_iterations=10)
        paths[site] = path
    return paths


def federation(tmp_path: Path, params: dict | None = None) -> tuple[Plans, Path, dict[str, Path]]:
    """plans.json and one round of valid updates under tmp_path."""
    plans = make_plans(params)
    plans_path = tmp_path / "plans.json"
    plans.save(plans_path)
    return plans, plans_path, write_updates(plans, tmp_path)


def round_model(tmp_path: Path, plans: Plans, updates: dict[str, Path]) -> Path:
    """A valid round-1 model file of site A (what `predict` and `train` read), as a copy
    that can be edited without touching the linked pool model."""
    aggregate_round(plans, list(updates.values()), tmp_path / "round_001")
    target = tmp_path / "model_A.safetensors"
    target.write_bytes((tmp_path / "round_001" / "A.safetensors").read_bytes())
    return target


def rewrite(path: Path, **meta_changes: Any) -> None:
    """Rewrite a weight file with changed metadata and a VALID content hash over it."""
    tensors, meta = read_weight_file(path)
    fields = {**meta.__dict__, **meta_changes}
    fields.pop("content_hash")
    write_weight_file(path, tensors, WeightMeta(**fields))


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict[str, Any], data: bytes, total_data: int | None = None) -> None:
    """Write a safetensors file from a header and data; `total_data` extends the data section
    sparsely (a hole of zeros that takes no disk space) up to that many bytes."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + data)
        if total_data is not None:
            handle.truncate(8 + len(text) + total_data)


def add_stowaway(path: Path, n_bytes: int = 3 * GIB // 2, name: str = "stowaway") -> None:
    """Declare one more float32 tensor of `n_bytes` at the end of the file (a sparse hole)."""
    header, data = read_header(path)
    header[name] = {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [len(data), len(data) + n_bytes]}
    write_raw(path, header, data, total_data=len(data) + n_bytes)


def assert_refused(capsys: pytest.CaptureFixture, rc: int, names: Path | str, fragment: str = "") -> str:
    """Exit 2 and one line on stderr that names the file (and says `fragment`), no traceback."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedseg: error: "), err
    assert str(names) in err and fragment in err, err
    return err


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}

"""Forging hostile weight files for the hostile-input tests: a small federation of tiny
tensors, and byte-level edits of a safetensors file that fedseg's writer would never make."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cli_inputs import listing

from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.site_update import write_site_update
from fedseg.federation.weightfile import write_weight_file
from fedseg.planning.plans import Plans

# the tiny plan and the refusal check are the unit tests' own (tests/unit)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_federation_engine import MANIFEST  # noqa: E402
from test_federation_engine import _rewrite as rewrite  # noqa: E402
from test_federation_engine import make_plans as engine_plans  # noqa: E402
from test_federation_validation_cli import assert_refused  # noqa: E402

__all__ = [
    "GIB", "MANIFEST", "add_stowaway", "aggregate_round", "assert_refused", "federation", "listing", "make_plans",
    "read_header", "rewrite", "round_model", "site_state", "write_raw", "write_site_update", "write_updates",
    "write_weight_file",
]

GIB = 1 << 30


def make_plans(params: dict | None = None, manifest: dict | None = None, sites: dict[str, int] | None = None) -> Plans:
    """The engine tests' tiny fedavg plan, with `params`, another manifest or other sites."""
    return engine_plans(params=params, sites=sites, manifest=manifest)


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

"""Shared pieces of the round-folder batteries: a tiny plan, its updates, the CLI's refusal shape."""

from __future__ import annotations

import sys
from pathlib import Path

# the tiny fedavg plan and its updates are the engine tests' own (tests/unit)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_federation_engine import _rewrite as rewrite  # noqa: E402
from test_federation_engine import make_plans, random_state, write_updates  # noqa: E402
from test_federation_validation_cli import aggregate, assert_refused  # noqa: E402

from fedseg.federation.site_update import write_site_update  # noqa: E402
from fedseg.planning.plans import Plans  # noqa: E402

__all__ = ["assert_refused", "aggregate", "files_of", "make_plans", "random_state", "rewrite", "setup_plan", "write_updates", "write_site_update"]


def setup_plan(folder: Path) -> tuple[Plans, Path]:
    plans = make_plans()
    plans_path = folder / "plans.json"
    plans.save(plans_path)
    return plans, plans_path


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (dot-files included: a leftover temporary file counts)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

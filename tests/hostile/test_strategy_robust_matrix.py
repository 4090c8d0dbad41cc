"""Every strategy x robust rule: refused at plan time (exit 2, one line) where the rule would
change what the strategy means, and aggregating as the rule says where it is allowed.

- fedavg, asymfedavg, fedmsa, fedsam: every pool is a weighted mean, so a coordinate median,
  a trimmed mean and norm clipping all keep their meaning;
- flames: a median of a group is one model for every site of it, so only clip_norm (which
  shortens each site's step and keeps the personalised mixture) is allowed;
- mixmfl: its prototype memories are merged by concatenation, which no robust rule fits;
- local: nothing is aggregated, so every robust key would be read by nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_inputs import listing, refused

from fedseg.federation.strategies import strategy_names

RULES = {"median": {"robust": "median"}, "trimmed": {"robust": "trimmed:0.2"}, "clip_norm": {"clip_norm": "0.05"}}
ALLOWED = {
    "fedavg": {"median", "trimmed", "clip_norm"},
    "asymfedavg": {"median", "trimmed", "clip_norm"},
    "fedmsa": {"median", "trimmed", "clip_norm"},
    "fedsam": {"median", "trimmed", "clip_norm"},
    "flames": {"clip_norm"},
    "mixmfl": set(),
    "local": set(),
}
COMBINATIONS = [(s, r) for s in sorted(ALLOWED) for r in sorted(RULES)]
SMALL = {"configuration.patch_size": "16,16,16"}   # cheap networks


def test_the_table_covers_every_strategy() -> None:
    assert set(ALLOWED) == set(strategy_names())


@pytest.mark.parametrize("strategy, rule", [c for c in COMBINATIONS if c[1] not in ALLOWED[c[0]]])
def test_refused_at_plan_time(strategy: str, rule: str, tiny_fingerprints: list[Path], tmp_path: Path, capsys) -> None:
    (key, value), = RULES[rule].items()
    refused(["plan", *map(str, tiny_fingerprints), "--strategy", strategy, "-o", str(tmp_path / "plans.json"),
             "--set", f"{key}={value}"], capsys, strategy, key)
    assert listing(tmp_path) == set()


def _round(strategy: str, params: dict, fingerprints: list[Path], run: Path):
    """Plan, round 0, and one round of updates (each site's round-0 weights plus its own noise)."""
    from fedseg.federation.round_zero import initial_round
    from fedseg.federation.site_update import write_site_update
    from fedseg.federation.run_setup import plan_run
    from fedseg.federation.weightfile import read_weight_file
    from fedseg.planning.fingerprint import load_fingerprint

    plans = plan_run([load_fingerprint(p) for p in fingerprints], strategy=strategy, rounds=2,
                     configuration="3d_fullres", iterations=None, overrides={**SMALL, **params}, seed=3)
    initial_round(plans, run / "round_000")
    paths = []
    for i, site in enumerate(sorted(plans.sites)):
        state, _ = read_weight_file(run / "round_000" / f"{site}.safetensors")
        rng = np.random.default_rng(i)
        moved = {k: (v + 0.01 * (i + 1) * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
                 for k, v in state.items()}
        path = run / "round_001" / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, moved, path, round_index=1, n_iterations=1)
        paths.append(path)
    return plans, paths


def _sent(path: Path) -> dict[str, np.ndarray]:
    from fedseg.federation.weightfile import read_weight_file

    tensors, _ = read_weight_file(path)
    return {k: v.astype(np.float64) for k, v in tensors.items() if v.dtype.kind == "f"}


# The trimmed mean takes the same path through the engine as the median (a rule replacing a
# weighted-mean pool) and its arithmetic is tested in tests/unit/test_federation_robust.py:
# here only its refusals are, to keep this battery fast.
@pytest.mark.parametrize("strategy, rule", [c for c in COMBINATIONS if c[1] in ALLOWED[c[0]] and c[1] != "trimmed"])
def test_allowed_combinations_aggregate_as_the_rule_says(strategy: str, rule: str, tiny_fingerprints: list[Path],
                                                         tmp_path: Path) -> None:
    from fedseg.federation.aggregation import aggregate_round

    params = RULES[rule]
    plans, paths = _round(strategy, params, tiny_fingerprints, tmp_path)
    report = aggregate_round(plans, paths, tmp_path / "round_001")
    out = tmp_path / "round_001"
    sites = sorted(plans.sites)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"{s}.safetensors" for s in sites]
    sent = {s: _sent(p) for s, p in zip(sites, paths)}
    loads = {s: _sent(out / f"{s}.safetensors") for s in sites}
    start = {s: _sent(tmp_path / "round_000" / f"{s}.safetensors") for s in sites}
    if rule == "median" and strategy in ("fedavg", "fedmsa", "fedsam"):
        # one pool over three sites: every site loads the coordinate median of what they sent
        key = sorted(sent[sites[0]])[0]
        expected = np.median(np.stack([sent[s][key] for s in sites]), axis=0)
        for s in sites:
            np.testing.assert_allclose(loads[s][key], expected, rtol=1e-6, atol=1e-7)
    if rule == "clip_norm":
        bound = float(RULES["clip_norm"]["clip_norm"])
        for s in sites:
            names = [k for k in sent[s] if k in loads[s]]
            step = np.sqrt(sum(np.sum((loads[s][k] - start[s][k]) ** 2) for k in names))
            # a (weighted) mean of steps each clipped to the bound is no longer than the bound
            assert 0 < step <= bound * (1 + 1e-4), (s, step)
    if strategy == "flames":
        # personal: the sites of one group load different models
        key = sorted(loads[sites[0]])[0]
        assert not np.allclose(loads[sites[0]][key], loads[sites[1]][key])
    assert report.round == 1

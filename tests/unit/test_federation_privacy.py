"""Secure aggregation (pairwise masks) and client-level differential privacy on the file protocol."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm
from test_federation_engine import N_CASES, make_plans, random_state

from fedseg.errors import InputError
from fedseg.federation import dp, secure_aggregation as sa
from fedseg.federation.aggregation import aggregate_round
from fedseg.federation.routes import attach_routes
from fedseg.federation.site_update import write_site_update
from fedseg.federation.privacy import SitePrivacy, plan_privacy, reveal_seeds
from fedseg.federation.signing import generate_key
from fedseg.federation.strategies import get_strategy
from fedseg.federation.weightfile import read_weight_file

SITES = tuple(sorted(N_CASES))
# one large tensor, so correlations and noise levels are measured on 40 000 values
BIG = {"w": {"shape": [200, 200], "dtype": "float32"}, "b": {"shape": [8], "dtype": "float32"}}


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for site in SITES:
        generate_key(site, folder)
    return folder


def private_plans(keydir: Path | None, params: dict, manifest: dict | None = None):
    plans = make_plans(params=params)
    if manifest is not None:
        plans.extra["manifests"] = {"3d_fullres": manifest}
        plans = attach_routes(plans)
    return plan_privacy(plans, get_strategy(plans.strategy.name), keydir)


def big_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(e["shape"]).astype(np.float32) * 0.1 for n, e in BIG.items()}


def write_round(plans, folder: Path, states: dict[str, dict], keydir: Path | None = None, start=None, round_index: int = 1):
    paths = {}
    for site, state in states.items():
        privacy = None
        if keydir is not None or start is not None:
            privacy = SitePrivacy(
                start=None if start is None else {k: np.asarray(v, np.float64) for k, v in start.items()},
                agreement_key=sa.load_agreement_key(keydir / f"{site}.key") if keydir is not None else None,
            )
        path = folder / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, state, path, round_index=round_index, n_iterations=5, privacy=privacy)
        paths[site] = path
    return paths


def global_model(round_dir: Path) -> dict[str, np.ndarray]:
    return read_weight_file(round_dir / "models" / "global.safetensors")[0]


def relative_error(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b))
    return num / math.sqrt(sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b))


# ---------------------------------------------------------------------------------------
# secure aggregation
# ---------------------------------------------------------------------------------------
def test_masked_round_equals_the_plain_round(keydir: Path, tmp_path: Path) -> None:
    states = {site: random_state(i + 1) for i, site in enumerate(SITES)}
    plain = make_plans()
    aggregate_round(plain, list(write_round(plain, tmp_path / "plain", states).values()), tmp_path / "plain" / "round_001")
    secure = private_plans(keydir, {"secure_aggregation": True})
    paths = write_round(secure, tmp_path / "secure", states, keydir)
    report = aggregate_round(secure, list(paths.values()), tmp_path / "secure" / "round_001")

    expected = global_model(tmp_path / "plain" / "round_001")
    got = global_model(tmp_path / "secure" / "round_001")
    assert relative_error(got, expected) <= 1e-6
    assert report.privacy["secure_aggregation"]["dropped"] == [] and report.privacy["dp"] is None
    assert all(record.update_norm is None for record in report.inputs)
    # every update on the wire is ring words, none of them the site's weights
    tensors, meta = read_weight_file(paths["A"])
    assert {a.dtype for a in tensors.values()} == {np.dtype(np.uint64)} and meta.n_cases == N_CASES["A"]


def test_a_masked_update_is_uncorrelated_with_the_real_one(keydir: Path, tmp_path: Path) -> None:
    plans = private_plans(keydir, {"secure_aggregation": True}, BIG)
    states = {site: big_state(i) for i, site in enumerate(SITES)}
    paths = write_round(plans, tmp_path, states, keydir)
    for site in SITES:
        masked = read_weight_file(paths[site])[0]["w"].reshape(-1)
        real = states[site]["w"].reshape(-1).astype(np.float64)
        as_numbers = sa.decode(masked)               # what the coordinator would read as the weighted value
        assert abs(np.corrcoef(as_numbers, real)[0, 1]) < 0.05
        # the same encoding without masks is the weighted value itself
        unmasked = sa.decode(sa.encode(N_CASES[site] * real, len(SITES), "test"))
        assert np.corrcoef(unmasked, real)[0, 1] > 0.999
    # ... and their sum is the weighted sum
    total = sum(read_weight_file(paths[s])[0]["w"].reshape(-1) for s in SITES)
    expected = sum(N_CASES[s] * states[s]["w"].reshape(-1).astype(np.float64) for s in SITES)
    np.testing.assert_allclose(sa.decode(total), expected, atol=1e-6)


def test_a_site_dropping_after_masking_still_gives_a_correct_round(keydir: Path, tmp_path: Path) -> None:
    # a quorum of two: the round may go on without C
    plans = private_plans(keydir, {"secure_aggregation": True, "min_sites": 2})
    states = {site: random_state(i + 1) for i, site in enumerate(SITES)}
    paths = write_round(plans, tmp_path, states, keydir)        # C masked with A and B, then never reported
    out = tmp_path / "round_001"
    with pytest.raises(InputError, match="site 'C' sent no update.*reveal-seeds"):
        aggregate_round(plans, [paths["A"], paths["B"]], out)
    assert not out.exists()
    recovery = [
        reveal_seeds(plans, sa.load_agreement_key(keydir / f"{s}.key"), 1, ["C"], tmp_path / "recovery" / f"{s}.json")
        for s in ("A", "B")
    ]
    with pytest.raises(InputError, match="site 'B' must reveal"):
        aggregate_round(plans, [paths["A"], paths["B"]], out, recovery=recovery[:1])
    report = aggregate_round(plans, [paths["A"], paths["B"]], out, recovery=recovery)

    plain = make_plans(params={"min_sites": 2})
    survivors = write_round(plain, tmp_path / "plain", {s: states[s] for s in ("A", "B")})
    aggregate_round(plain, list(survivors.values()), tmp_path / "plain" / "round_001")
    assert relative_error(global_model(out), global_model(tmp_path / "plain" / "round_001")) <= 1e-6
    assert report.privacy["secure_aggregation"]["dropped"] == ["C"]
    assert report.missing_sites == ["C"]
    # once its masks are recovered, a late file from C is refused, with or without the recovery files
    with pytest.raises(InputError, match="masks for round 1 were recovered"):
        aggregate_round(plans, list(paths.values()), out)
    with pytest.raises(InputError, match="masks for round 1 were recovered"):
        aggregate_round(plans, list(paths.values()), tmp_path / "elsewhere", recovery=recovery)


def test_recovery_reveals_only_the_seeds_with_the_dropped_site(keydir: Path, tmp_path: Path) -> None:
    plans = private_plans(keydir, {"secure_aggregation": True})
    path = reveal_seeds(plans, sa.load_agreement_key(keydir / "A.key"), 2, ["C"], tmp_path / "A.json")
    body = json.loads(path.read_text())
    assert body["site"] == "A" and body["round"] == 2 and set(body["seeds"]["global"]) == {"C"}
    key_b = sa.load_agreement_key(keydir / "B.key")
    public = sa.plan_public_keys(plans)
    # the revealed seed is exactly the pair's seed for that round (what B derives from its side)
    assert bytes.fromhex(body["seeds"]["global"]["C"]) == sa.pair_seed(
        sa.load_agreement_key(keydir / "C.key"), "A", public["A"], plans.plan_id, 2, "global")
    # and a different round's seed of the same pair is a different one
    assert sa.pair_seed(key_b, "C", public["C"], plans.plan_id, 1, "global") != sa.pair_seed(
        key_b, "C", public["C"], plans.plan_id, 2, "global")


def test_fixed_point_refuses_values_that_could_wrap() -> None:
    bound = sa.value_bound(8)
    assert bound * 8 * 2.0 ** sa.SCALE_BITS <= 2.0 ** 63
    with pytest.raises(InputError, match="too large for secure aggregation"):
        sa.encode(np.array([bound * 1.01]), 8, "tensor 'w'")
    values = np.array([-bound * 0.99, -1.5, 0.0, 2.0 ** -30, bound * 0.99])
    words = [sa.encode(values, 8, "x") for _ in range(8)]
    total = np.zeros(values.size, dtype=np.uint64)
    for w in words:
        total += w
    np.testing.assert_allclose(sa.decode(total), 8 * values, rtol=1e-12, atol=2.0 ** -31)


# ---------------------------------------------------------------------------------------
# plan-time refusals
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, params, message",
    [
        ("flames", {"secure_aggregation": True}, "merges pool 'group:MRI' by a rule that needs each site's update"),
        ("flames", {"dp.clip": 1.0, "dp.noise_multiplier": 1.0}, "needs pools that are weighted sums"),
        ("fedavg", {"secure_aggregation": True, "robust": "median"}, "cannot be combined with robust=median"),
        ("fedavg", {"secure_aggregation": True, "clip_norm": 2.0}, "cannot be combined with clip_norm"),
        ("fedavg", {"secure_aggregation": True, "max_update_norm": 9.0}, "cannot be combined with max_update_norm"),
        ("fedavg", {"dp.clip": 1.0}, "needs both dp.clip and dp.noise_multiplier"),
        ("fedavg", {"dp.clip": 1.0, "dp.noise_multiplier": 1.0, "dp.delta": 1.0}, "dp.delta must be a positive number and below 1"),
        ("fedavg", {"dp.clip": 1.0, "dp.noise_multiplier": 1.0, "dp.accountant": "moments"}, "dp.accountant must be one of"),
        ("fedavg", {"secure_aggregation": "yes"}, "secure_aggregation must be true or false"),
    ],
)
def test_refused_at_plan_time(keydir: Path, strategy: str, params: dict, message: str) -> None:
    plans = make_plans(strategy, params)
    with pytest.raises(InputError, match=message):
        get_strategy(strategy).check_params(plans.strategy.params)
        plan_privacy(plans, get_strategy(strategy), keydir)


def test_secure_aggregation_needs_every_sites_agreement_key(keydir: Path, tmp_path: Path) -> None:
    plans = make_plans(params={"secure_aggregation": True})
    with pytest.raises(InputError, match="needs --keys"):
        plan_privacy(plans, get_strategy("fedavg"), None)
    (tmp_path / "A.pub").write_bytes((keydir / "A.pub").read_bytes())
    with pytest.raises(InputError, match="no public key for site 'B'"):
        plan_privacy(plans, get_strategy("fedavg"), tmp_path)
    secure = private_plans(keydir, {"secure_aggregation": True})
    with pytest.raises(InputError, match="give --key"):
        write_round(secure, tmp_path, {"A": random_state(1)}, start={})


def test_cli_aggregate_refuses_a_missing_masked_site_in_one_line(keydir: Path, tmp_path: Path, capsys) -> None:
    from fedseg.cli.main import run

    plans = private_plans(keydir, {"secure_aggregation": True, "min_sites": 2})
    plans.save(tmp_path / "plans.json")
    paths = write_round(plans, tmp_path, {s: random_state(i) for i, s in enumerate(SITES)}, keydir)
    rc = run(["aggregate", "--plans", str(tmp_path / "plans.json"), str(paths["A"]), str(paths["B"]), "-o", str(tmp_path / "r1"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "site 'C' sent no update" in err and not (tmp_path / "r1").exists()
    for site in ("A", "B"):
        assert run(["reveal-seeds", "--site", site, "--plans", str(tmp_path / "plans.json"), "--key", str(keydir / f"{site}.key"),
                    "--round", "1", "--dropped", "C", "-o", str(tmp_path / f"{site}.json"), "-q"]) == 0
    assert run(["aggregate", "--plans", str(tmp_path / "plans.json"), str(paths["A"]), str(paths["B"]), "-o", str(tmp_path / "r1"),
                "--recovery", str(tmp_path / "A.json"), "--recovery", str(tmp_path / "B.json"), "-q"]) == 0


# ---------------------------------------------------------------------------------------
# differential privacy
# ---------------------------------------------------------------------------------------
def rdp_epsilon_closed_form(sigma: float, rounds: int, delta: float) -> float:
    """RDP of the Gaussian mechanism, α·T/(2σ²), to (ε, δ) with the conversion of Canonne,
    Kamath & Steinke 2020 (Prop. 12), minimised over a fine grid of orders α."""
    alphas = np.concatenate([np.linspace(1.01, 10.0, 2000), np.linspace(10.0, 1000.0, 20000)])
    rdp = alphas * rounds / (2.0 * sigma ** 2)
    eps = rdp + np.log1p(-1.0 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1.0)
    return float(np.min(eps))


def gaussian_epsilon_exact(sigma: float, rounds: int, delta: float) -> float:
    """The exact ε of T composed Gaussian mechanisms (one Gaussian with μ = √T/σ; Balle & Wang 2018)."""
    mu = math.sqrt(rounds) / sigma

    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 500.0)


@pytest.mark.parametrize("sigma, rounds", [(1.0, 10), (2.5, 30), (0.8, 3)])
def test_reported_epsilon_matches_an_independent_computation(sigma: float, rounds: int) -> None:
    expected = rdp_epsilon_closed_form(sigma, rounds, 1e-5)
    got = dp.epsilon([sigma] * rounds, 1e-5, "rdp")
    # the library minimises over a fixed set of orders: never below the grid minimum, within 3 %
    assert expected * 0.999 <= got <= expected * 1.03
    exact = gaussian_epsilon_exact(sigma, rounds, 1e-5)
    pld = dp.epsilon([sigma] * rounds, 1e-5, "pld")
    assert exact * 0.999 <= pld <= exact * 1.02 and pld < got


def dp_params(**extra) -> dict:
    return {"dp.clip": 0.5, "dp.noise_multiplier": 1.0, **extra}


def test_dp_round_clips_noises_and_states_epsilon(tmp_path: Path) -> None:
    plans = private_plans(None, dp_params(), BIG)
    start = big_state(99)
    states = {site: big_state(i) for i, site in enumerate(SITES)}
    paths = write_round(plans, tmp_path, states, start=start)
    for site in SITES:   # each site sent start + a delta of norm exactly clip (its delta was longer)
        sent = read_weight_file(paths[site])[0]
        assert dp.delta_norm(sent, start) == pytest.approx(0.5, rel=1e-5)
    report = aggregate_round(plans, list(paths.values()), tmp_path / "round_001")

    clipped = {s: dp.clip_update(states[s], start, 0.5)[0] for s in SITES}
    weights = {s: N_CASES[s] / max(N_CASES.values()) for s in SITES}
    mean = sum(weights[s] * clipped[s]["w"] for s in SITES) / sum(weights.values())
    noise = global_model(tmp_path / "round_001")["w"] - mean
    expected_std = 1.0 * 0.5 / sum(weights.values())          # σ·C on the sum, over Σ a_k
    assert float(np.std(noise)) == pytest.approx(expected_std, rel=0.05)
    record = report.privacy["dp"]
    assert record["noise_added_by"] == "coordinator" and record["rounds"] == 1
    assert record["epsilon"] == pytest.approx(dp.epsilon([1.0], 1e-5))
    # written to aggregate.json too (what `status` and the next round read)
    assert json.loads((tmp_path / "round_001" / "aggregate.json").read_text())["privacy"]["dp"]["epsilon"] == record["epsilon"]


def test_dp_with_secure_aggregation_has_the_sites_add_the_noise(keydir: Path, tmp_path: Path) -> None:
    plans = private_plans(keydir, dp_params(secure_aggregation=True), BIG)
    start = big_state(99)
    states = {site: big_state(i) for i, site in enumerate(SITES)}
    paths = write_round(plans, tmp_path, states, keydir, start=start)
    report = aggregate_round(plans, list(paths.values()), tmp_path / "round_001")
    clipped = {s: dp.clip_update(states[s], start, 0.5)[0] for s in SITES}
    weights = {s: N_CASES[s] / max(N_CASES.values()) for s in SITES}
    mean = sum(weights[s] * clipped[s]["w"] for s in SITES) / sum(weights.values())
    noise = global_model(tmp_path / "round_001")["w"] - mean
    assert float(np.std(noise)) == pytest.approx(0.5 / sum(weights.values()), rel=0.05)
    assert report.privacy["dp"]["noise_added_by"] == "sites"
    assert report.privacy["dp"]["round_noise_multiplier"] == pytest.approx(1.0)


def test_max_epsilon_stops_the_federation_before_the_budget_is_exceeded(tmp_path: Path) -> None:
    one_round = dp.epsilon([1.0], 1e-5)
    two_rounds = dp.epsilon([1.0, 1.0], 1e-5)
    plans = private_plans(None, dp_params(**{"dp.max_epsilon": (one_round + two_rounds) / 2}))
    start = random_state(99)
    states = {site: random_state(i + 1) for i, site in enumerate(SITES)}
    aggregate_round(plans, list(write_round(plans, tmp_path / "round_001", states, start=start).values()), tmp_path / "round_001")
    second = write_round(plans, tmp_path / "round_002", states, start=start, round_index=2)
    with pytest.raises(InputError, match=r"dp.max_epsilon=.*round 2 would bring ε to .*stops after round 1"):
        aggregate_round(plans, list(second.values()), tmp_path / "round_002")
    assert not (tmp_path / "round_002" / "aggregate.json").exists()
    # without the first round's record the privacy spent so far is unknown: refused too
    with pytest.raises(InputError, match="cannot account for the privacy spent before round 2"):
        aggregate_round(plans, list(second.values()), tmp_path / "round_002", previous_dir=tmp_path / "nowhere")


def test_simulate_checks_the_budget_before_training_a_round(tmp_path: Path) -> None:
    from fedseg.federation.privacy import check_budget_before_round

    one_round = dp.epsilon([1.0], 1e-5)
    plans = private_plans(None, dp_params(**{"dp.max_epsilon": one_round * 1.01}))
    check_budget_before_round(plans, tmp_path / "round_000", 1)      # round 1 fits
    start = random_state(99)
    states = {site: random_state(i + 1) for i, site in enumerate(SITES)}
    aggregate_round(plans, list(write_round(plans, tmp_path / "round_001", states, start=start).values()), tmp_path / "round_001")
    with pytest.raises(InputError, match="round 2 would bring ε"):
        check_budget_before_round(plans, tmp_path / "round_001", 2)


def test_status_states_epsilon_after_each_round(tmp_path: Path, capsys) -> None:
    from fedseg.cli.main import run
    from fedseg.federation.run_status import run_status

    plans = private_plans(None, dp_params(), BIG)
    plans.save(tmp_path / "plans.json")
    start = big_state(99)
    paths = write_round(plans, tmp_path / "round_001", {site: big_state(i) for i, site in enumerate(SITES)}, start=start)
    report = aggregate_round(plans, list(paths.values()), tmp_path / "round_001")
    state = run_status(tmp_path)
    assert state.rounds[0].privacy == {"secure_aggregation": False, "epsilon": report.privacy["dp"]["epsilon"], "delta": 1e-5}
    assert run(["status", str(tmp_path)]) == 0
    assert f"ε {report.privacy['dp']['epsilon']:.3g} at δ 1e-05" in capsys.readouterr().out

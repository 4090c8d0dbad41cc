"""Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018): clip, noise, account.

- Clip (at each site): the site's update delta Δ = w − w_start over every tensor it sends is
  scaled to L2 norm ≤ C (`dp.clip`); the site sends w_start + clip(Δ).
- Noise: each pool's weighted sum Σ a_k w_k (a_k ≤ 1, see fedseg.federation.privacy) gets
  Gaussian noise N(0, (σC)²) per coordinate, σ = `dp.noise_multiplier`. Without secure
  aggregation the coordinator adds it; with it every site of a pool adds a share N(0, (σC)²/K)
  (K = the pool's sites in the plan), so the sum carries (σC)² when all report. When some drop,
  the sum carries less noise; the round is accounted with the noise it really got,
  σ_round = σ·sqrt(reporting/K) (the smallest over the pools).
- Adjacency: one site's data added or removed, its clipped delta replaced by zero (the
  "zero-out" form of add/remove: which sites take part is public, it is in the plan), so the
  sum's L2 sensitivity is C. Each round is a Gaussian mechanism with noise multiplier
  σ_round, every site takes part in every round (no sampling amplification is claimed), and
  the rounds compose.
- Accounting: dp-accounting's RDP (default) or PLD accountant states ε at δ after every round.

Noise comes from the operating system's entropy, never from the plan's seed: noise that
anybody could regenerate from a public seed protects nothing. This is the one place where
fedseg is deliberately not reproducible from the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedseg.errors import InputError


def delta_norm(current: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (current − start) over every tensor of `current`, in float64."""
    total = 0.0
    for name, array in current.items():
        if name not in start:
            raise ValueError(f"no starting value for tensor {name!r}")
        d = np.asarray(array, dtype=np.float64).reshape(-1) - np.asarray(start[name], dtype=np.float64).reshape(-1)
        total += float(np.dot(d, d))
    return math.sqrt(total)


def clip_update(
    current: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """(start + min(1, C/‖Δ‖)·Δ per tensor in float64, the factor applied)."""
    norm = delta_norm(current, start)
    factor = 1.0 if norm <= clip else clip / norm
    out = {}
    for name, array in current.items():
        base = np.asarray(start[name], dtype=np.float64)
        out[name] = base + factor * (np.asarray(array, dtype=np.float64) - base)
    return out, factor


def system_rng() -> np.random.Generator:
    """A generator seeded from the operating system's entropy (see the module note)."""
    return np.random.default_rng()


def gaussian(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, std, size=shape) if std > 0 else np.zeros(shape)


def _accountant(name: str):
    try:
        # lazily: dp-accounting is an optional extra (fedseg[privacy])
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant  # optional extra, as above
        from dp_accounting.rdp import rdp_privacy_accountant  # optional extra, as above
    except ImportError:
        raise InputError(
            "differential privacy needs the dp-accounting package: pip install 'fedseg[privacy]'"
        ) from None
    if name == "pld":
        return dp_accounting, pld_privacy_accountant.PLDAccountant()
    return dp_accounting, rdp_privacy_accountant.RdpAccountant()


def epsilon(noise_multipliers: Sequence[float], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` after one Gaussian mechanism (sensitivity 1) per entry, composed.

    Equal noise multipliers are composed as one self-composed event (fast for the PLD accountant).
    """
    if not noise_multipliers:
        return 0.0
    if any(not s > 0 for s in noise_multipliers):
        return math.inf
    library, acc = _accountant(accountant)
    counts: dict[float, int] = {}
    for sigma in noise_multipliers:
        counts[float(sigma)] = counts.get(float(sigma), 0) + 1
    for sigma, count in sorted(counts.items()):
        acc.compose(library.GaussianDpEvent(sigma), count)
    return float(acc.get_epsilon(delta))

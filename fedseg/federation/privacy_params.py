"""The privacy parameters of a plan: secure aggregation and client-level differential privacy.

Set with `fedseg plan --set KEY=VALUE` (strategy parameters, so plan_id covers them):

- `secure_aggregation=true`   sites send pairwise-masked fixed-point updates; the coordinator
                              only ever sees their sum (fedseg.federation.secure_aggregation);
- `dp.clip=C`                 L2 bound on each site's update delta (its weights minus the model
                              it started the round from), over every tensor it sends;
- `dp.noise_multiplier=S`     Gaussian noise of standard deviation S·C on each pool's sum;
- `dp.delta=D`                the δ at which ε is stated (default 1e-5);
- `dp.max_epsilon=E`          the federation stops before a round would take ε above E;
- `dp.accountant=rdp|pld`     the dp-accounting accountant (default rdp).

`dp.clip` and `dp.noise_multiplier` switch DP on; the other dp keys need them. Only parsing
and value checks live here (imported by the strategy base and validation); what the options
do is in fedseg.federation.privacy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedseg.errors import InputError

SECURE_AGGREGATION = "secure_aggregation"
DP_PARAMS = ("dp.clip", "dp.noise_multiplier", "dp.delta", "dp.max_epsilon", "dp.accountant")
PRIVACY_PARAMS: frozenset[str] = frozenset({SECURE_AGGREGATION, *DP_PARAMS})
ACCOUNTANTS = ("rdp", "pld")
# δ should be well below 1/(number of sites); 1e-5 is the usual default for a handful of sites.
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class DPSpec:
    clip: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    max_epsilon: float | None = None
    accountant: str = "rdp"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PrivacySpec:
    secure_aggregation: bool = False
    dp: DPSpec | None = None

    @property
    def active(self) -> bool:
        return self.secure_aggregation or self.dp is not None


def _positive(params: Mapping[str, Any], key: str, upper: float | None = None) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0 \
            or (upper is not None and not value < upper):
        bound = f" and below {upper:g}" if upper is not None else ""
        raise InputError(f"{key} must be a positive number{bound}, got {value!r}")
    return float(value)


def parse_privacy(params: Mapping[str, Any]) -> PrivacySpec:
    """PrivacySpec from plans.strategy.params; InputError on a malformed or incomplete value."""
    secure = params.get(SECURE_AGGREGATION, False)
    if not isinstance(secure, bool):
        raise InputError(f"{SECURE_AGGREGATION} must be true or false, got {secure!r}")
    given = [key for key in DP_PARAMS if key in params]
    if not given:
        return PrivacySpec(secure_aggregation=secure)
    clip = _positive(params, "dp.clip")
    sigma = _positive(params, "dp.noise_multiplier")
    if clip is None or sigma is None:
        raise InputError(f"differential privacy needs both dp.clip and dp.noise_multiplier (given: {', '.join(given)})")
    delta = _positive(params, "dp.delta", upper=1.0)
    accountant = params.get("dp.accountant", "rdp")
    if accountant not in ACCOUNTANTS:
        raise InputError(f"dp.accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    dp = DPSpec(
        clip=clip, noise_multiplier=sigma, delta=DEFAULT_DELTA if delta is None else delta,
        max_epsilon=_positive(params, "dp.max_epsilon"), accountant=accountant,
    )
    return PrivacySpec(secure_aggregation=secure, dp=dp)

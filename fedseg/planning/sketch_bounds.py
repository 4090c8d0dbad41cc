"""What a quantile sketch read from a file (fedseg.planning.sketch `from_dict`) may hold.

A sketch may come from another site: every number is bounded before use. Alpha sets the key
range, which sizes the dense bucket store; bucket contents must fit int64 sums.
"""

from __future__ import annotations

import math
from typing import Any

# The dense bucket store spans the keys present, at most 2 * 745 / ln(gamma) of them
# (~1.5 million, 12 MB, at alpha 1e-3), so alpha is bounded below; bucket contents (counts, or
# weights in units of 2**-30) sum in int64, so they are capped at 2**62.
READ_ALPHA_RANGE = (1e-3, 0.5)
MAX_CONTENTS = 2**62


def nonnegative_int(value: Any, what: str) -> int:
    """A JSON integer from 0 to MAX_CONTENTS; ValueError naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CONTENTS:
        shown = repr(value) if len(repr(value)) <= 24 else "a number out of range"
        raise ValueError(f"{what} must be a non-negative integer up to 2^62, not {shown}")
    return value


def finite_number(value: Any, what: str) -> float:
    """A JSON number as a finite float; ValueError for inf/NaN, strings or a 400-digit integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{what} is beyond the float range") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, not {number}")
    return number


def bucket_key(text: Any, limit: int) -> int:
    """A bucket key (a JSON object key) as an integer with |key| <= limit; ValueError otherwise."""
    try:
        key = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"bucket key {str(text)[:24]!r} is not an integer") from None
    if abs(key) > limit:
        raise ValueError(f"bucket key {key if abs(key) < 10**12 else '(huge)'} is beyond the float64 range (|key| <= {limit})")
    return key

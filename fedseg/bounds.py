"""Bounds on the numbers fedseg reads from files another institution wrote.

A JSON integer can have hundreds of digits and a JSON float can be 1e400 (= inf), so a count
or a spacing taken as it comes can overflow a float sum (OverflowError), make the weights of
an average infinite, or size an allocation. Every number a reader takes from another site is
checked against a bound here at read time, before any arithmetic. The bounds are generous
for real federations and small enough that sums over many sites stay exact in float64
(every one is below 2**53 even when multiplied by a thousand sites).
"""

from __future__ import annotations

import math
from typing import Any

MAX_ROUND = 1_000_000                   # federated rounds of one run
MAX_SITE_CASES = 10_000_000             # training cases at one site (fingerprint, update n_cases)
MAX_SITE_ITERATIONS = 1_000_000_000     # training iterations of one site in one round
MAX_TOTAL_COUNT = 10**12                # counts that sum over sites (a pool model's n_cases)
MAX_EXACT_INT = 2**53                   # the largest integer every JSON reader (float64) holds exactly
MAX_LABEL = 65_535                      # label values (segmentations are stored as uint8/uint16)
MAX_SPACING = 1e6                       # voxel spacing in mm (a kilometre per voxel)
MAX_AXIS = 2**31 - 1                    # voxels along one image axis


def bounded_int(value: Any, low: int, high: int) -> bool:
    """Whether `value` is a JSON integer (not a bool) in [low, high]."""
    return type(value) is int and low <= value <= high


def bounded_float(value: Any, low: float, high: float) -> bool:
    """Whether `value` is a finite JSON number (int or float, not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:   # an integer beyond the float range
        return False
    return math.isfinite(number) and low <= number <= high


def short(value: Any) -> str:
    """A value for an error message, never hundreds of digits long."""
    text = repr(value) if type(value) is not int or value.bit_length() < 80 else ""
    if type(value) is int and not text:
        return f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 40 else text[:37] + "..."


def unbounded_number(value: Any) -> str | None:
    """Why a JSON value holds a number no reader can use (inf/NaN, a 400-digit integer), or None.

    Iterative: a hostile value may nest deeply (its size is bounded by its file's size cap)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return f"holds a non-finite number ({item})"
        elif type(item) is int and abs(item) > MAX_EXACT_INT:
            return f"holds an integer beyond ±2^53 ({short(item)})"
    return None

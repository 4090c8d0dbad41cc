"""JSON-ready copies of training state that keep NaN (checkpoints and cached case properties).

Unlike fedseg.atomic.json_safe, NaN and infinities stay floats: a checkpoint's Dice may be NaN
(no foreground present) and must read back as NaN, so it is written with allow_nan=True.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def jsonable(obj: Any) -> Any:
    """A copy of `obj` with string keys, lists for tuples and arrays, and Python numbers for numpy scalars."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

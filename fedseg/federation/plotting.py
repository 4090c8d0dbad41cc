"""matplotlib for writing image files only: the Agg backend, chosen before pyplot is imported,
because a coordinator or a cluster node has no display (and must never open a window)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["MaxNLocator", "plt"]

"""Keep-largest-connected-component post-processing, and its federated decision.

nnU-Net's rule (postprocessing/remove_connected_components.py): remove all but the largest
connected component of (a) the whole foreground, treated as one mask, then (b) each
foreground label on its own. Each step is kept only where it raises the validation Dice.

Federated, no prediction leaves a site: each site scores its validation predictions with
and without each step (`postprocessing_scores`, numbers only); the coordinator adds the
sites' sums (so every case weighs the same) and decides (`decide_postprocessing`), in
nnU-Net's order and with nnU-Net's tests:

- whole foreground: kept when the foreground mean Dice rises and no label's mean Dice falls;
- each label (only with more than one foreground label): kept when that label's mean Dice
  rises, measured on top of the foreground decision.

Removing voxels of one label changes only that label's Dice (they become background), so a
site can score every label's step on both foreground variants at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

# Variants a site scores: base prediction (none or whole-foreground step) x per-label step.
BASE_VARIANTS = ("none", "foreground")
VARIANTS = ("none", "none+label", "foreground", "foreground+label")


@dataclass
class PostprocessingDecision:
    """What predict applies after argmax: the whole-foreground step, then listed labels' steps."""

    largest_foreground: bool = False
    largest_per_label: list[int] = field(default_factory=list)   # dataset.json label values

    def apply(self, seg: np.ndarray, foreground_labels: Sequence[int]) -> np.ndarray:
        out = seg
        if self.largest_foreground:
            out = keep_largest_component(out, foreground_labels)
        for label in self.largest_per_label:
            out = keep_largest_component(out, [label])
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PostprocessingDecision:
        return cls(bool(d.get("largest_foreground", False)), [int(v) for v in d.get("largest_per_label", [])])


def keep_largest_component(seg: np.ndarray, labels: Iterable[int]) -> np.ndarray:
    """A copy of `seg` where, of the voxels holding any of `labels`, only the largest connected
    component (full connectivity, as nnU-Net's skimage default) keeps its labels; the rest
    becomes background (0)."""
    mask = np.isin(seg, list(labels))
    if not mask.any():
        return seg.copy()
    components, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(seg.ndim, seg.ndim))
    if n <= 1:
        return seg.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out = seg.copy()
    out[mask & (components != int(np.argmax(sizes)))] = 0
    return out


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice of one label; NaN when the label is in neither (nnU-Net leaves such cases out)."""
    p, r = pred == label, ref == label
    denominator = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    if denominator == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(p & r)) / denominator


@dataclass
class DiceSums:
    """Per label and variant: [sum of case Dice, number of cases with a Dice] (NaN cases left out)."""

    sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)   # label name -> variant -> [sum, count]
    n_cases: int = 0

    def add_case(self, pred: np.ndarray, ref: np.ndarray, labels: Mapping[str, int]) -> None:
        foreground = [v for v in labels.values() if v != 0]
        bases = {"none": pred, "foreground": keep_largest_component(pred, foreground)}
        for name, value in labels.items():
            if value == 0:
                continue
            entry = self.sums.setdefault(name, {v: [0.0, 0] for v in VARIANTS})
            for base, seg in bases.items():
                for variant, scored in ((base, seg), (f"{base}+label", keep_largest_component(seg, [value]))):
                    d = dice(scored, ref, value)
                    if not math.isnan(d):
                        entry[variant][0] += d
                        entry[variant][1] += 1
        self.n_cases += 1

    def merge(self, other: DiceSums) -> None:
        for name, variants in other.sums.items():
            entry = self.sums.setdefault(name, {v: [0.0, 0] for v in VARIANTS})
            for variant, (total, count) in variants.items():
                entry[variant][0] += total
                entry[variant][1] += count
        self.n_cases += other.n_cases

    def label_mean(self, name: str, variant: str) -> float:
        total, count = self.sums[name][variant]
        return total / count if count else float("nan")

    def foreground_mean(self, variant: str = "none") -> float:
        """Mean over labels of the label's mean Dice (nnU-Net's foreground_mean); NaN labels left out."""
        means = [self.label_mean(name, variant) for name in self.sums]
        means = [m for m in means if not math.isnan(m)]
        return float(np.mean(means)) if means else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"n_cases": self.n_cases, "dice_sums": self.sums}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiceSums:
        sums = {
            str(name): {str(v): [float(pair[0]), int(pair[1])] for v, pair in variants.items()}
            for name, variants in d["dice_sums"].items()
        }
        return cls(sums, int(d["n_cases"]))


def decide_postprocessing(scores: DiceSums, labels: Mapping[str, int]) -> tuple[PostprocessingDecision, dict[str, Any]]:
    """nnU-Net's decision from (merged) Dice sums; also returns the numbers behind it."""
    decision = PostprocessingDecision()
    before = scores.foreground_mean("none")
    after = scores.foreground_mean("foreground")
    no_label_worse = all(
        not scores.label_mean(name, "foreground") < scores.label_mean(name, "none") for name in scores.sums
    )
    decision.largest_foreground = bool(after > before and no_label_worse)
    base = "foreground" if decision.largest_foreground else "none"
    evidence: dict[str, Any] = {"foreground": {"dice_without": before, "dice_with": after}, "per_label": {}}
    if len(scores.sums) > 1:
        for name in scores.sums:
            without, with_step = scores.label_mean(name, base), scores.label_mean(name, f"{base}+label")
            evidence["per_label"][name] = {"dice_without": without, "dice_with": with_step}
            if with_step > without:
                decision.largest_per_label.append(int(labels[name]))
    final = {name: scores.label_mean(name, f"{base}+label" if labels[name] in decision.largest_per_label else base)
             for name in scores.sums}
    finite = [v for v in final.values() if not math.isnan(v)]
    evidence["dice_after"] = float(np.mean(finite)) if finite else float("nan")
    return decision, evidence

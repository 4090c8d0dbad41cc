"""Keep-largest-component post-processing and its federated decision (nnU-Net's rule, from
the sites' Dice sums)."""

from __future__ import annotations

import numpy as np

from fedseg.training.postprocessing import DiceSums, PostprocessingDecision, decide_postprocessing, keep_largest_component

LABELS = {"background": 0, "lesion": 1}


def _blob(shape, corner, size, value=1, into=None):
    out = np.zeros(shape, dtype=np.int16) if into is None else into
    out[tuple(slice(c, c + size) for c in corner)] = value
    return out


def _site_sums(cases, labels=LABELS) -> DiceSums:
    sums = DiceSums()
    for pred, ref in cases:
        sums.add_case(pred, ref, labels)
    return sums


def test_keep_largest_component_removes_only_smaller_islands() -> None:
    seg = _blob((12, 12, 12), (1, 1, 1), 4)
    seg = _blob(None, (9, 9, 9), 2, into=seg)
    kept = keep_largest_component(seg, [1])
    assert kept[1:5, 1:5, 1:5].all() and not kept[9:11, 9:11, 9:11].any()
    assert np.array_equal(keep_largest_component(kept, [1]), kept)


def test_spurious_island_is_removed_by_the_federated_decision() -> None:
    """Every site's predictions find the lesion plus a small false island: merged over sites
    the rule raises Dice, so it is kept, and predict's decision removes the island."""
    shape = (16, 16, 16)
    sites = []
    for offset in range(3):
        ref = _blob(shape, (2 + offset, 3, 3), 6)
        pred = _blob(shape, (2 + offset, 3, 3), 6)
        pred = _blob(None, (13, 13, 13 - offset), 2, into=pred)      # the island
        sites.append(_site_sums([(pred, ref)]))
    merged = DiceSums()
    for site in sites:
        merged.merge(DiceSums.from_dict(site.to_dict()))   # through the file format
    decision, evidence = decide_postprocessing(merged, LABELS)
    assert decision.largest_foreground
    assert evidence["foreground"]["dice_with"] == 1.0 > evidence["foreground"]["dice_without"]
    assert merged.n_cases == 3
    out = decision.apply(pred, [1])
    assert out.sum() == 6 ** 3 and not out[13:, 13:, :].any()


def test_component_rule_that_would_hurt_is_rejected() -> None:
    """References with two separate lesions, predicted well: keeping the largest component
    would delete a true lesion, so the merged Dice falls and the rule is not kept, even
    though one site alone (with an island) would have gained from it."""
    shape = (16, 16, 16)
    two_lesions = _blob(None, (10, 10, 10), 4, into=_blob(shape, (1, 1, 1), 5))
    site_a = _site_sums([(two_lesions.copy(), two_lesions.copy()), (two_lesions.copy(), two_lesions.copy())])
    ref = _blob(shape, (2, 2, 2), 6)
    with_island = _blob(None, (13, 13, 13), 1, into=ref.copy())
    site_b = _site_sums([(with_island, ref)])
    alone, _ = decide_postprocessing(site_b, LABELS)
    assert alone.largest_foreground
    merged = DiceSums()
    merged.merge(site_a)
    merged.merge(site_b)
    decision, evidence = decide_postprocessing(merged, LABELS)
    assert not decision.largest_foreground and decision.largest_per_label == []
    assert evidence["foreground"]["dice_with"] < evidence["foreground"]["dice_without"]
    assert np.array_equal(decision.apply(two_lesions, [1]), two_lesions)


def test_per_label_rule_is_decided_label_by_label() -> None:
    """Two labels: label 1 has a false island (rule kept), label 2 is truly two pieces (rule
    rejected); the whole-foreground rule would delete label 2 entirely and is rejected."""
    labels = {"background": 0, "liver": 1, "cyst": 2}
    shape = (20, 20, 20)
    ref = _blob(shape, (1, 1, 1), 7, value=1)
    ref = _blob(None, (12, 12, 12), 3, value=2, into=ref)
    ref = _blob(None, (12, 1, 12), 3, value=2, into=ref)
    pred = ref.copy()
    pred = _blob(None, (1, 17, 17), 2, value=1, into=pred)       # false liver island
    decision, evidence = decide_postprocessing(_site_sums([(pred, ref)], labels), labels)
    assert not decision.largest_foreground
    assert decision.largest_per_label == [1]
    assert evidence["per_label"]["cyst"]["dice_with"] < evidence["per_label"]["cyst"]["dice_without"]
    assert np.array_equal(decision.apply(pred, [1, 2]), ref)
    assert PostprocessingDecision.from_dict(decision.to_dict()) == decision

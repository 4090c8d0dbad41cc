"""Site fingerprints and their federated merge: merging sites == fingerprinting the pooled data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_fill_holes

from fedseg.data.cropping import bbox_of_mask, crop_to_nonzero
from fedseg.data.dataset import load_dataset
from fedseg.errors import InputError
from fedseg.planning.fingerprint import (
    FINGERPRINT_FORMAT_VERSION,
    compute_fingerprint,
    foreground_sketch,
    load_fingerprint,
    nonzero_bbox,
    save_fingerprint,
)
from fedseg.planning.merge import merge_fingerprints
from fedseg.planning.sketch import DEFAULT_ALPHA, WEIGHT_UNIT

PROPS = "foreground_intensity_properties_per_channel"
VOXEL_PROPS = "foreground_intensity_properties_per_channel_voxel_weighted"
QUANTILE_KEYS = (("percentile_00_5", 0.005), ("median", 0.5), ("percentile_99_5", 0.995))

LABELS = {"background": 0, "organ": 1, "lesion": 2}
CHANNELS = {"0": "T1", "1": "T2"}


def _write(array: np.ndarray, spacing_zyx, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(image, str(path))


def make_case(rng: np.random.Generator, site_index: int):
    """A case with a zero frame (so cropping matters), two channels and two foreground labels."""
    shape = tuple(int(s) for s in rng.integers(14, 22, size=3))
    spacing = (float(rng.choice([1.0, 2.5, 3.0])), float(rng.uniform(0.7, 1.2)), float(rng.uniform(0.7, 1.2)))
    data = np.zeros((2, *shape), dtype=np.float32)
    lo = [int(rng.integers(0, 3)) for _ in shape]
    hi = [s - int(rng.integers(0, 3)) for s in shape]
    body = tuple(slice(a, b) for a, b in zip(lo, hi))
    scale = 100.0 * (1 + site_index)                  # sites differ in intensity scale
    data[0][body] = rng.gamma(3.0, scale, size=[b - a for a, b in zip(lo, hi)])
    data[1][body] = rng.normal(-50.0 * site_index, 30.0, size=[b - a for a, b in zip(lo, hi)])
    seg = np.zeros(shape, dtype=np.uint8)
    center = [(a + b) // 2 for a, b in zip(lo, hi)]
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    dist = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2
    seg[dist < 16] = 1
    seg[dist < 4] = 2
    return data, seg, spacing


def write_dataset(root: Path, cases: list[tuple[str, np.ndarray, np.ndarray, tuple]]) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case_id, data, seg, spacing in cases:
        for c in range(data.shape[0]):
            _write(data[c], spacing, root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
        _write(seg, spacing, root / "labelsTr" / f"{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": CHANNELS, "labels": LABELS, "numTraining": len(cases), "file_ending": ".nii.gz",
    }))
    return root


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three site folders, and one pooled folder holding the same cases."""
    root = tmp_path_factory.mktemp("fp")
    rng = np.random.default_rng(42)
    sites = {}
    for s, site in enumerate(["a_site", "b_site", "c_site"]):
        sites[site] = [(f"{site[0]}_{i:03d}", *make_case(rng, s)) for i in range(3 + s)]
    site_dirs = {site: write_dataset(root / site, cases) for site, cases in sites.items()}
    pooled_cases = [case for cases in sites.values() for case in cases]
    pooled_dir = write_dataset(root / "pooled", pooled_cases)
    return site_dirs, pooled_dir, pooled_cases


def weighted_inverted_cdf(values: np.ndarray, weights: np.ndarray, q: float, tol: float) -> np.ndarray:
    """nnU-Net's percentile of equally many samples per case, in the limit: the weighted inverted CDF.

    Rank rule: sort the values ascending, C_i = cumulative weight of x_(0..i), W = total
    weight; the q-quantile is x_(i) for the smallest i with C_i >= q * W. The sketch rounds
    bucket weights to 2**-30, so where q * W is within `tol` of a C_i both neighbours are
    accepted: every candidate is returned.
    """
    order = np.argsort(values, kind="stable")
    v, cum = values[order], np.cumsum(weights[order])
    lo = np.searchsorted(cum, q * cum[-1] - tol, side="left")
    hi = np.searchsorted(cum, q * cum[-1] + tol, side="left")
    return v[min(lo, v.size - 1): min(hi, v.size - 1) + 1]


def test_nonzero_bbox_equals_bbox_of_hole_filled_mask():
    rng = np.random.default_rng(0)
    for _ in range(20):
        data = np.zeros((2, 12, 13, 11), dtype=np.float32)
        data[rng.random(data.shape) < 0.02] = 1.0
        data[0, 3:9, 2:10, 4:8] = 5.0
        data[0, 5:7, 4:8, 5:7] = 0.0                       # an enclosed hole
        filled = binary_fill_holes(np.any(data != 0, axis=0))
        assert nonzero_bbox(data) == bbox_of_mask(filled)
    assert nonzero_bbox(np.zeros((1, 4, 5, 6))) == [[0, 4], [0, 5], [0, 6]]


def test_merged_sites_equal_pooled_fingerprint(federation):
    site_dirs, pooled_dir, pooled_cases = federation
    site_fps = [compute_fingerprint(load_dataset(d), name) for name, d in site_dirs.items()]
    pooled_fp = compute_fingerprint(load_dataset(pooled_dir), "pooled")
    merged = merge_fingerprints(site_fps[::-1])          # input order must not matter
    pooled = merge_fingerprints([pooled_fp])

    assert merged["spacings"] == pooled["spacings"]
    assert merged["shapes_after_crop"] == pooled["shapes_after_crop"]
    assert merged["median_relative_size_after_cropping"] == pooled["median_relative_size_after_cropping"]
    assert merged["n_cases"] == pooled["n_cases"] == len(pooled_cases)
    assert sorted(merged["sites"]) == ["a_site", "b_site", "c_site"]

    # reference values straight from the voxels, with the data module's nnU-Net crop (holes filled)
    for c in range(2):
        per_case = []
        for _, data, seg, spacing in pooled_cases:
            cropped, cropped_seg, _ = crop_to_nonzero(data, seg.astype(np.int16))
            per_case.append(cropped[c][cropped_seg > 0].astype(np.float64))
        fg = np.concatenate(per_case)
        for key in (PROPS, VOXEL_PROPS):
            props, pooled_props = merged[key][str(c)], pooled[key][str(c)]
            assert props.keys() == pooled_props.keys()
            for name, value in pooled_props.items():   # equal up to float summation order
                assert props[name] == pytest.approx(value, rel=1e-12), (key, name)

        # voxel-weighted: the exact statistics of all pooled foreground voxels
        props = merged[VOXEL_PROPS][str(c)]
        assert props["mean"] == pytest.approx(fg.mean(), rel=1e-9)
        assert props["std"] == pytest.approx(fg.std(), rel=1e-9)
        assert props["min"] == fg.min() and props["max"] == fg.max()
        for key, q in QUANTILE_KEYS:
            lo, hi = np.percentile(fg, 100 * q, method="lower"), np.percentile(fg, 100 * q, method="higher")
            exact = np.percentile(fg, 100 * q)
            assert abs(props[key] - exact) <= DEFAULT_ALPHA * max(abs(lo), abs(hi)) + 1e-9, key

        # case-weighted (nnU-Net's key): every case weighs 1, each of its voxels 1 / its voxel count
        weights = np.concatenate([np.full(v.size, 1.0 / v.size) for v in per_case])
        props = merged[PROPS][str(c)]
        mean = np.average(fg, weights=weights)
        assert props["mean"] == pytest.approx(mean, rel=1e-12)
        assert props["mean"] == pytest.approx(np.mean([v.mean() for v in per_case]), rel=1e-12)
        assert props["std"] == pytest.approx(np.sqrt(np.average((fg - mean) ** 2, weights=weights)), rel=1e-9)
        assert props["min"] == fg.min() and props["max"] == fg.max()
        n_buckets = sum(len(foreground_sketch(fp, str(c), case_weighted=True).to_dict()[sign])
                        for fp in site_fps for sign in ("positive", "negative")) + 1
        tol = 0.5 * WEIGHT_UNIT * n_buckets * len(per_case)     # the sketch's 2**-30 rounding of weights
        for key, q in QUANTILE_KEYS:
            candidates = weighted_inverted_cdf(fg, weights, q, tol)
            assert np.any(np.abs(props[key] - candidates) <= DEFAULT_ALPHA * np.abs(candidates) + 1e-9), key
        assert merged["foreground_cases_per_channel"][str(c)] == len(pooled_cases)
        assert merged["foreground_voxels_per_channel"][str(c)] == fg.size

    # the per-case lists also match what the images say
    expected_shapes = []
    for _, data, seg, spacing in pooled_cases:
        cropped, _, _ = crop_to_nonzero(data, seg.astype(np.int16))
        expected_shapes.append(list(cropped.shape[1:]))
    assert merged["shapes_after_crop"] == expected_shapes
    np.testing.assert_allclose(merged["spacings"], [list(c[3]) for c in pooled_cases], rtol=1e-6)


def test_fingerprint_holds_no_voxels_and_round_trips(federation, tmp_path):
    site_dirs, _, _ = federation
    fp = compute_fingerprint(load_dataset(site_dirs["a_site"]), "a_site")
    assert fp["format_version"] == FINGERPRINT_FORMAT_VERSION == 2 and fp["site"] == "a_site"
    assert fp["labels"] == LABELS and fp["channel_names"] == CHANNELS and fp["file_ending"] == ".nii.gz"
    assert fp["n_cases"] == 3 and len(fp["spacings"]) == 3
    assert not any(case.case_id in json.dumps(fp) for case in load_dataset(site_dirs["a_site"]).cases("Tr"))
    stats = fp["foreground_stats_per_channel"]["0"]
    assert set(stats) == {"count", "sum", "sumsq", "min", "max", "sketch", "case_weighted"}
    assert set(stats["case_weighted"]) == {"cases", "weight", "sum", "sumsq", "sketch"}
    assert stats["case_weighted"]["cases"] == 3 and stats["case_weighted"]["weight"] == pytest.approx(3, rel=1e-15)
    path = tmp_path / "a.json"
    save_fingerprint(fp, path)
    assert load_fingerprint(path) == fp
    assert path.stat().st_size < 200_000


def test_workers_give_identical_output(federation):
    site_dirs, pooled_dir, _ = federation
    dataset = load_dataset(pooled_dir)
    calls = []
    one = compute_fingerprint(dataset, "pooled", workers=1, progress=lambda n, info: calls.append((n, info)))
    two = compute_fingerprint(dataset, "pooled", workers=2)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert calls == [(1, case.case_id) for case in dataset.cases("Tr")]


def test_bad_case_raises_input_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    data, seg, spacing = make_case(rng, 0)
    seg[0, 0, 0] = 7                                     # not a declared label
    root = write_dataset(tmp_path / "bad", [("x_000", data, seg, spacing)])
    with pytest.raises(InputError, match="x_000") as info:
        compute_fingerprint(load_dataset(root), "bad")
    assert info.value.path.name == "x_000.nii.gz"

    data2, seg2, spacing2 = make_case(rng, 0)
    root2 = write_dataset(tmp_path / "bad2", [("y_000", data2, seg2, spacing2), ("y_001", data2, seg2, spacing2)])
    _write(np.zeros((3, 3, 3), dtype=np.float32), spacing2, root2 / "imagesTr" / "y_001_0001.nii.gz")
    with pytest.raises(InputError, match="y_001") as info:
        compute_fingerprint(load_dataset(root2), "bad2", workers=2)
    assert info.value.path.name == "y_001_0001.nii.gz"


def test_load_fingerprint_refuses_other_json(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"dataset_name": "x"}))
    with pytest.raises(InputError, match="not a valid fedseg fingerprint") as info:
        load_fingerprint(path)
    assert info.value.path == path
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(InputError, match="not a fedseg fingerprint"):
        load_fingerprint(garbage)


def test_load_fingerprint_refuses_old_or_inconsistent_files(federation, tmp_path):
    site_dirs, _, _ = federation
    fp = compute_fingerprint(load_dataset(site_dirs["a_site"]), "a_site")

    def refused(change, match):
        broken = json.loads(json.dumps(fp))
        change(broken)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(InputError, match=match) as info:
            load_fingerprint(path)
        assert info.value.path == path

    refused(lambda d: d.update(format_version=1), "format_version 1, expected 2; recompute")
    refused(lambda d: d["foreground_stats_per_channel"]["0"].pop("case_weighted"), "channel 0: no 'case_weighted'")
    refused(lambda d: d["foreground_stats_per_channel"]["1"]["case_weighted"].update(sum=1.0),
            "channel 1: case_weighted weight/sum/sumsq disagree")
    refused(lambda d: d["foreground_stats_per_channel"]["0"]["case_weighted"].update(cases=7), "cases must be")
    refused(lambda d: d["foreground_stats_per_channel"]["0"]["case_weighted"].update(cases=2),
            "is not its number of cases")
    # the two sketches swapped: a weighted sketch where counts belong
    refused(lambda d: d["foreground_stats_per_channel"]["0"].update(
        sketch=d["foreground_stats_per_channel"]["0"]["case_weighted"]["sketch"]), "channel 0")


def test_cases_without_foreground_are_left_out_like_nnunet(tmp_path):
    """nnU-Net samples no intensities from a case without foreground; the case still counts for shapes."""
    rng = np.random.default_rng(9)
    with_fg = [(f"f_{i:03d}", *make_case(rng, i)) for i in range(2)]
    data, seg, spacing = make_case(rng, 2)
    empty = ("f_009", data, np.zeros_like(seg), spacing)
    fp_all = compute_fingerprint(load_dataset(write_dataset(tmp_path / "all", [*with_fg, empty])), "s")
    fp_fg = compute_fingerprint(load_dataset(write_dataset(tmp_path / "fg", with_fg)), "s")
    for c in ("0", "1"):
        assert fp_all["foreground_stats_per_channel"][c] == fp_fg["foreground_stats_per_channel"][c]
        assert fp_all["foreground_stats_per_channel"][c]["case_weighted"]["cases"] == 2
    merged = merge_fingerprints([fp_all])
    assert merged["n_cases"] == 3 and merged["foreground_cases_per_channel"] == {"0": 2, "1": 2}
    assert merged[PROPS] == merge_fingerprints([fp_fg])[PROPS]


def test_merge_refuses_incompatible_fingerprints(federation):
    site_dirs, _, _ = federation
    a = compute_fingerprint(load_dataset(site_dirs["a_site"]), "a_site")
    b = compute_fingerprint(load_dataset(site_dirs["b_site"]), "b_site")

    other_labels = json.loads(json.dumps(b))
    other_labels["labels"] = {"background": 0, "organ": 1, "tumour": 2}
    with pytest.raises(InputError, match="labels") as info:
        merge_fingerprints([a, other_labels], names=["a.json", "b.json"])
    assert str(info.value.path) == "b.json"

    with pytest.raises(InputError, match="twice"):
        merge_fingerprints([a, json.loads(json.dumps(a))], names=["a.json", "a2.json"])

    one_channel = json.loads(json.dumps(b))
    one_channel["channel_names"] = {"0": "T1"}
    del one_channel["foreground_stats_per_channel"]["1"]
    with pytest.raises(InputError, match="channel"):
        merge_fingerprints([a, one_channel])
    relaxed = merge_fingerprints([a, one_channel], require_same_channels=False)
    assert relaxed["channel_names"] == {"0": "T1", "1": "T2"}
    assert relaxed["foreground_voxels_per_channel"]["0"] == (
        a["foreground_stats_per_channel"]["0"]["count"] + b["foreground_stats_per_channel"]["0"]["count"])

    two_d = json.loads(json.dumps(b))
    two_d["image_dim"] = 2
    two_d["file_ending"] = ".png"
    with pytest.raises(InputError, match="2D"):
        merge_fingerprints([a, two_d])


def test_workers_start_fresh_when_torch_is_loaded(federation, monkeypatch):
    import sys
    import types

    from fedseg.planning import fingerprint as fingerprint_module

    site_dirs, _, _ = federation
    dataset = load_dataset(site_dirs["b_site"])
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert fingerprint_module._pool_context().get_start_method() != "fork"
    assert compute_fingerprint(dataset, "b_site", workers=2) == compute_fingerprint(dataset, "b_site")


def test_merging_and_reading_fingerprints_load_no_image_library():
    """The coordinator reads, validates and merges fingerprints without SimpleITK or nibabel
    (fedseg.planning.fingerprint_file); only computing one (fedseg.planning.fingerprint) reads images."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import fedseg.data.voxel_limit, fedseg.planning.fingerprint_file, fedseg.planning.merge\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('SimpleITK', 'nibabel')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"

"""Per-channel intensity normalisation schemes, as nnU-Net defines them.

- CTNormalization: CT intensities are physical (Hounsfield units), so one global mapping
  for the whole dataset is right: clip to the 0.5 / 99.5 percentiles of the foreground
  intensities and z-score with the foreground mean/std. In fedseg these statistics come
  from the *federated* fingerprint (merged over all sites), so every site maps intensities
  the same way without sharing voxels.
- ZScoreNormalization: MRI and most other modalities have arbitrary units that differ per
  scan, so each image is z-scored on its own. With `use_mask_for_norm` only the nonzero
  region (seg >= 0 after cropping) counts and the outside is set to 0, so a large empty
  frame does not distort the statistics.
- RescaleTo01Normalization: min-max to [0, 1] per image.
- NoNormalization: only cast to float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# Floor for the divisor: a constant image (std 0) must not produce inf/NaN (nnU-Net: 1e-8).
MIN_STD = 1e-8


def ct_normalization(image: np.ndarray, properties: Mapping[str, float]) -> np.ndarray:
    """Clip to the fingerprint's [percentile_00_5, percentile_99_5], then (x - mean) / std."""
    try:
        lower = float(properties["percentile_00_5"])
        upper = float(properties["percentile_99_5"])
        mean = float(properties["mean"])
        std = float(properties["std"])
    except KeyError as exc:
        raise ValueError(f"CTNormalization needs intensity property {exc.args[0]!r} from the fingerprint") from None
    out = np.clip(image.astype(np.float32), lower, upper)
    out -= mean
    out /= max(std, MIN_STD)
    return out


def zscore_normalization(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / std over the whole image, or over `mask` with the outside set to 0."""
    out = image.astype(np.float32, copy=True)
    if mask is None:
        # float64 accumulation: float32 sums over millions of voxels lose digits.
        mean = out.mean(dtype=np.float64)
        std = out.std(dtype=np.float64)
        out -= mean
        out /= max(std, MIN_STD)
        return out
    if not mask.any():
        return np.zeros_like(out)
    inside = out[mask]
    mean = inside.mean(dtype=np.float64)
    std = inside.std(dtype=np.float64)
    out[mask] = (inside - mean) / max(std, MIN_STD)
    out[~mask] = 0.0
    return out


def rescale_to_01(image: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min); a constant image becomes all zeros."""
    out = image.astype(np.float32, copy=True)
    out -= out.min()
    out /= max(float(out.max()), MIN_STD)
    return out


def no_normalization(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32, copy=True)


SCHEMES: dict[str, str] = {
    "CTNormalization": "fingerprint percentiles + mean/std (dataset-wide)",
    "ZScoreNormalization": "per-image z-score (optionally within the nonzero mask)",
    "RescaleTo01Normalization": "per-image min-max to [0, 1]",
    "NoNormalization": "cast only",
}


def normalize(
    data: np.ndarray,
    seg: np.ndarray | None,
    schemes: Sequence[str],
    use_mask_for_norm: Sequence[bool],
    intensity_properties: Mapping[str, Mapping[str, float]] | None,
) -> np.ndarray:
    """Normalise each channel of (C, z, y, x) data with its scheme; returns float32.

    `seg` is the cropped segmentation (z, y, x) or (1, z, y, x) whose negative values mark
    the outside of the nonzero region; it is needed only where `use_mask_for_norm` is True
    (and only ZScoreNormalization uses the mask, as in nnU-Net). `intensity_properties` is the
    merged fingerprint's `foreground_intensity_properties_per_channel` ({"0": {...}, ...}),
    needed only for CTNormalization.
    """
    if data.ndim != 4:
        raise ValueError(f"expected (C, z, y, x) data, got shape {data.shape}")
    n_channels = data.shape[0]
    if len(schemes) != n_channels or len(use_mask_for_norm) != n_channels:
        raise ValueError(
            f"{n_channels} channels but {len(schemes)} normalisation schemes and "
            f"{len(use_mask_for_norm)} use_mask_for_norm flags"
        )
    mask = None
    if seg is not None:
        seg_3d = seg[0] if seg.ndim == 4 else seg
        if seg_3d.shape != data.shape[1:]:
            raise ValueError(f"seg shape {seg.shape} does not match data shape {data.shape}")
        mask = seg_3d >= 0
    out = np.empty(data.shape, dtype=np.float32)
    for c, (scheme, use_mask) in enumerate(zip(schemes, use_mask_for_norm)):
        out[c] = _channel_normalizer(scheme, c, use_mask, mask, intensity_properties)(data[c])
    return out


def _channel_normalizer(
    scheme: str,
    channel: int,
    use_mask: bool,
    mask: np.ndarray | None,
    intensity_properties: Mapping[str, Mapping[str, float]] | None,
) -> Callable[[np.ndarray], np.ndarray]:
    if scheme == "CTNormalization":
        if intensity_properties is None or str(channel) not in intensity_properties:
            raise ValueError(f"CTNormalization of channel {channel} needs the fingerprint's intensity properties")
        props = intensity_properties[str(channel)]
        return lambda image: ct_normalization(image, props)
    if scheme == "ZScoreNormalization":
        if use_mask and mask is None:
            raise ValueError("use_mask_for_norm needs the cropped segmentation (seg >= 0 marks the inside)")
        return lambda image: zscore_normalization(image, mask if use_mask else None)
    if scheme == "RescaleTo01Normalization":
        return rescale_to_01
    if scheme == "NoNormalization":
        return no_normalization
    raise ValueError(f"unknown normalisation scheme {scheme!r} (known: {', '.join(SCHEMES)})")

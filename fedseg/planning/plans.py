"""The plans file: the single source of truth every site and the coordinator derive from.

Versioned dataclasses <-> JSON. `plan_id` is the sha256 of the canonical JSON of everything
but the id itself; every weight file carries it, so an update made under another plan is
refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from fedseg.data.labels import LabelLayout, parse_labels
from fedseg.atomic import write_text_atomic
from fedseg.errors import InputError
from fedseg.names import check_site_name
from fedseg.planning.plan_checks import check_plan_values

# 2: plans.extra["routes"], the route table of every site's tensors (fedseg.federation.routes)
PLANS_FORMAT_VERSION = 2


@dataclass
class NetworkSpec:
    """nnU-Net's plain conv U-Net, fully determined by these numbers."""

    n_stages: int
    features_per_stage: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]                # strides[0] is all ones (no pooling at stage 0)
    n_conv_per_stage: list[int]
    n_conv_per_stage_decoder: list[int]      # one entry per decoder stage (n_stages - 1)
    deep_supervision: bool = True


@dataclass
class ConfigurationPlan:
    """One configuration ("3d_fullres" or "2d"), as nnU-Net's plans hold it."""

    name: str
    spacing: list[float]                     # target spacing, (z, y, x)
    patch_size: list[int]                    # (z, y, x) for 3d, (y, x) for 2d
    median_image_size_in_voxels: list[float]
    batch_size: int
    normalization_schemes: list[str]         # per channel: CTNormalization | ZScoreNormalization | RescaleTo01Normalization | NoNormalization
    use_mask_for_norm: list[bool]
    network: NetworkSpec
    resampling_separate_z_anisotropy_threshold: float = 3.0

    @property
    def ndim(self) -> int:
        return len(self.patch_size)


@dataclass
class SiteInfo:
    modality: str
    channels: list[str]
    n_cases: int
    configuration: str | None = None         # per-site configuration (asymfedavg); None = the default


@dataclass
class TrainingSpec:
    rounds: int = 3
    iterations_per_round: int = 50
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    loss: str = "dice_ce"
    oversample_foreground_percent: float = 0.33
    # nnU-Net's five-fold cross-validation: each site splits its own training cases into
    # n_folds folds (seeded by the plan seed and the site name), fold k validates on chunk k.
    n_folds: int = 5


@dataclass
class StrategySpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plans:
    dataset_name: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]       # as dataset.json: a list is a region (fedseg.data.labels)
    file_ending: str
    fingerprint: dict[str, Any]              # merged fingerprint, nnU-Net key names
    sites: dict[str, SiteInfo]
    strategy: StrategySpec
    configurations: dict[str, ConfigurationPlan]
    default_configuration: str
    training: TrainingSpec = field(default_factory=TrainingSpec)
    seed: int = 1234
    keys: dict[str, str] = field(default_factory=dict)   # site (or "coordinator") -> Ed25519 public key, hex
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific planned data (e.g. shared-parameter maps)
    format_version: int = PLANS_FORMAT_VERSION
    regions_class_order: list[int] | None = None   # region-based labels only

    # -- identity -------------------------------------------------------------------------
    def content_dict(self) -> dict[str, Any]:
        return _plain_labels_as_before(asdict(self))

    @property
    def plan_id(self) -> str:
        # The canonical JSON of `content_dict()`, written straight from the dataclasses: a plan
        # records every tensor's route, and copying it all first (`asdict`) took most of the time.
        return hashlib.sha256(canonical_json(self, default=_content_fields).encode("utf-8")).hexdigest()

    # -- lookups --------------------------------------------------------------------------
    def configuration_for(self, site: str | None = None) -> ConfigurationPlan:
        if site is not None and site in self.sites and self.sites[site].configuration:
            return self.configurations[self.sites[site].configuration]
        return self.configurations[self.default_configuration]

    def site(self, name: str) -> SiteInfo:
        if name not in self.sites:
            raise InputError(f"site {name!r} is not in the plan (sites: {', '.join(sorted(self.sites))})")
        return self.sites[name]

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_layout(self) -> LabelLayout:
        return parse_labels(self.labels, self.regions_class_order)

    @property
    def label_values(self) -> list[int]:
        """Every value a label map may hold, sorted (0 included)."""
        return self.label_layout.label_values

    @property
    def n_classes(self) -> int:
        """Network outputs: one per label value (softmax), or one per foreground region (sigmoid)."""
        return self.label_layout.n_outputs

    # -- (de)serialisation ---------------------------------------------------------------
    def to_json(self) -> str:
        body = self.content_dict()
        body["plan_id"] = self.plan_id
        return json.dumps(body, indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plans:
        d = dict(d)
        d.pop("plan_id", None)
        version = d.get("format_version")
        if version != PLANS_FORMAT_VERSION:
            raise ValueError(f"plans format_version {version!r} is not supported (expected {PLANS_FORMAT_VERSION})")
        configurations = {
            name: ConfigurationPlan(**{**c, "network": NetworkSpec(**c["network"])})
            for name, c in d.pop("configurations").items()
        }
        return cls(
            configurations=configurations,
            sites={name: SiteInfo(**s) for name, s in d.pop("sites").items()},
            strategy=StrategySpec(**d.pop("strategy")),
            training=TrainingSpec(**d.pop("training")),
            **d,
        )


def load_plans(path: str | Path) -> Plans:
    """Read plans.json; a stored plan_id that does not match the content means it was edited."""
    path = Path(path)
    if not path.is_file():
        raise InputError("plans file not found", path)
    try:
        raw = json.loads(path.read_text())
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version < PLANS_FORMAT_VERSION:
            raise InputError(
                f"is a plan of format {version}, made by an older fedseg; re-plan with `fedseg plan` "
                f"(format {PLANS_FORMAT_VERSION} records every tensor's route)", path,
            )
        plans = Plans.from_dict(raw)
        computed = plans.plan_id   # ValueError for NaN or infinity, which canonical JSON cannot hold
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", path) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"not a fedseg plans file ({type(exc).__name__}: {exc})", path) from None
    stored = raw.get("plan_id")
    if stored is not None and stored != computed:
        raise InputError("plan_id does not match the content (the file was edited after planning)", path)
    # site names become file names at the coordinator and at every site
    for name in [*plans.sites, *plans.keys]:
        check_site_name(name, path)
    try:
        check_plan_values(plans)
    except InputError as exc:
        raise InputError(exc.detail, path) from None
    return plans


def canonical_json(obj: Any, default: Callable[[Any], Any] | None = None) -> str:
    """Key-sorted, whitespace-free JSON: the same content always hashes the same. `default`:
    what an object JSON does not know is written as (json.dumps)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=default)


def _content_fields(obj: Any) -> dict[str, Any]:
    """A dataclass of the plan as its fields, as `asdict` and `content_dict` write it (without
    copying): for canonical_json."""
    if not is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    body = {f.name: getattr(obj, f.name) for f in fields(obj)}
    return _plain_labels_as_before(body) if isinstance(obj, Plans) else body


def _plain_labels_as_before(body: dict[str, Any]) -> dict[str, Any]:
    """A plan's fields without `regions_class_order` when it is None: plain labels keep the
    content (and plan_id) they had before regions existed."""
    if body["regions_class_order"] is None:
        del body["regions_class_order"]
    return body

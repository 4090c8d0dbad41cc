"""An nnU-Net raw dataset folder: dataset.json plus imagesTr/labelsTr (and optional Ts splits).

Layout (as nnU-Net v2):
    dataset.json                      channel_names, labels, numTraining, file_ending
    imagesTr/{CASE}_{XXXX}{ending}    XXXX = 4-digit channel index
    labelsTr/{CASE}{ending}
    imagesTs/, labelsTs/              optional test split, same naming
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.data.image_io import SUPPORTED_ENDINGS
from fedseg.data.labels import LabelLayout, layout_to_json, parse_labels
from fedseg.errors import InputError

# Natural 2D images may hold several channels in one file (RGB: channels 0-2 in `_0000`).
MULTICHANNEL_ENDINGS = (".png", ".bmp", ".tif")
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass(frozen=True)
class Case:
    """One case: its channel files in channel order, and its label file if it has one.

    `n_channels`: the channels the files must hold together (dataset.json's count); more than
    the number of files when a natural image holds colour channels (RGB in one `_0000` file).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    n_channels: int | None = None


@dataclass(frozen=True)
class Dataset:
    """A validated dataset.json together with the folder it describes."""

    root: Path
    name: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]      # as dataset.json: a list is a region
    num_training: int
    file_ending: str
    modality: str
    raw: dict = field(repr=False, compare=False, default_factory=dict)
    regions_class_order: list[int] | None = None

    @property
    def label_layout(self) -> LabelLayout:
        return parse_labels(self.labels, self.regions_class_order)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return self.label_layout.label_values

    def cases(self, split: str = "Tr", require_labels: bool | None = None) -> list[Case]:
        """Cases of a split ("Tr" or "Ts"), sorted by case id.

        Training cases must have labels; test cases may lack them. A case with a missing
        channel file is an error naming that file.
        """
        if split not in ("Tr", "Ts"):
            raise ValueError(f"split must be 'Tr' or 'Ts', not {split!r}")
        if require_labels is None:
            require_labels = split == "Tr"
        images_dir = self.root / f"images{split}"
        labels_dir = self.root / f"labels{split}"
        if not images_dir.is_dir():
            if split == "Tr":
                raise InputError("no imagesTr folder", self.root)
            return []
        return collect_cases(images_dir, labels_dir, self.file_ending, self.n_channels, require_labels)


def collect_cases(
    images_dir: Path,
    labels_dir: Path | None,
    file_ending: str,
    n_channels: int,
    require_labels: bool,
) -> list[Case]:
    """Group `{CASE}_{XXXX}{ending}` files of a folder into cases and check every channel exists."""
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + r"$")
    channels_by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        match = pattern.match(path.name)
        if match is None:
            continue
        channels_by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    if not channels_by_case:
        raise InputError(f"no cases named {{CASE}}_{{XXXX}}{file_ending}", images_dir)
    cases = []
    for case_id, channels in sorted(channels_by_case.items()):
        missing = [c for c in range(n_channels) if c not in channels]
        if missing and file_ending in MULTICHANNEL_ENDINGS and channels and missing[0] == len(channels):
            # A colour image holds several channels in one file, as nnU-Net reads RGB
            # (files 0..k-1 present); load_case checks that they add up to n_channels.
            missing = []
        if missing:
            expected = images_dir / f"{case_id}_{missing[0]:04d}{file_ending}"
            raise InputError(f"case {case_id}: missing channel {missing[0]} (dataset.json declares {n_channels})", expected)
        extra = sorted(c for c in channels if c >= n_channels)
        if extra:
            raise InputError(
                f"case {case_id}: channel {extra[0]} not declared in dataset.json (it declares {n_channels})",
                channels[extra[0]],
            )
        label = None
        if labels_dir is not None:
            candidate = labels_dir / f"{case_id}{file_ending}"
            if candidate.is_file():
                label = candidate
            elif require_labels:
                raise InputError(f"case {case_id}: label file missing", candidate)
        files = tuple(channels[c] for c in sorted(channels))
        cases.append(Case(case_id, files, label, n_channels))
    return cases


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate `root/dataset.json`; raise InputError naming the fault."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset folder does not exist", root)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise InputError("no dataset.json in the dataset folder", root)
    try:
        raw = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", json_path) from None
    if not isinstance(raw, dict):
        raise InputError("must hold a JSON object", json_path)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise InputError(f"missing key(s) {', '.join(missing)}", json_path)

    channel_names = raw["channel_names"]
    if not isinstance(channel_names, dict) or not channel_names:
        raise InputError("channel_names must be a non-empty object {\"0\": \"CT\", ...}", json_path)
    if sorted(channel_names) != [str(i) for i in range(len(channel_names))]:
        raise InputError("channel_names keys must be 0..N-1", json_path)
    channel_names = {str(k): str(v) for k, v in sorted(channel_names.items(), key=lambda kv: int(kv[0]))}

    layout = parse_labels(raw["labels"], raw.get("regions_class_order"), json_path)

    file_ending = raw["file_ending"]
    if file_ending not in SUPPORTED_ENDINGS:
        raise InputError(f"file_ending {file_ending!r} not supported (use one of {', '.join(SUPPORTED_ENDINGS)})", json_path)
    num_training = raw["numTraining"]
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        raise InputError("numTraining must be a non-negative integer", json_path)

    modality = raw.get("modality") or modality_from_channels(channel_names)
    return Dataset(
        root=root,
        name=str(raw.get("name", root.name)),
        channel_names=channel_names,
        labels=layout_to_json(layout),
        num_training=num_training,
        file_ending=file_ending,
        modality=str(modality),
        raw=raw,
        regions_class_order=list(layout.regions_class_order) if layout.has_regions else None,
    )


def modality_from_channels(channel_names: dict[str, str]) -> str:
    """The site's imaging modality: the first channel's name, upper-cased ("MRI", "US", "CT").

    MRI sequences (T1, T2, FLAIR, ...) count as "MRI". dataset.json's `modality` key overrides.
    """
    first = channel_names["0"].strip()
    mri_sequences = {"T1", "T1CE", "T1C", "T1GD", "T2", "FLAIR", "T2W", "T1W", "ADC", "DWI", "PD"}
    if first.upper().replace("-", "") in mri_sequences:
        return "MRI"
    return first.upper()

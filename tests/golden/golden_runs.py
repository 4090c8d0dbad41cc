"""One tiny round of every strategy, through the library, and a fingerprint of every tensor it writes.

Each run is fingerprint -> plan -> init (round_000) -> train each site -> aggregate (round_001),
on a small subset of a synthetic preset, with small patches, two iterations and no augmentation
workers, on the CPU. The record (tests/golden/tensors.json) holds, for every weight file of
round_000 and round_001 (updates, site files, pool models), every tensor's shape, dtype and the
sha256 of its bytes (compared exactly), plus three statistics that say how large a difference is.
tests/golden/test_golden.py reruns the same runs and compares. A run takes about 30 s of one core
for the seven strategies.

Regenerate after an intended numeric change (and say which change, and why, in the commit):

    PYTHONPATH=$PWD python scripts/record_golden.py
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GOLDEN_FILE = Path(__file__).with_name("tensors.json")
SEED = 0
ITERATIONS = 2


@dataclass(frozen=True)
class GoldenRun:
    strategy: str
    preset: str
    sites: tuple[str, ...]
    configuration: str = "3d_fullres"
    overrides: dict[str, str] = field(default_factory=dict)
    # site -> training cases kept: sites of different sizes, so that weighting by case count
    # shows in the tensors (every preset gives its sites the same number of cases)
    training_cases: dict[str, int] = field(default_factory=dict)


PATCH_16 = {"configuration.patch_size": "16,16,16", "configuration.batch_size": "2"}
PATCH_2D = {"configuration.batch_size": "2"}

RUNS: tuple[GoldenRun, ...] = (
    GoldenRun("fedavg", "tiny", ("site_a", "site_b"), overrides=PATCH_16, training_cases={"site_b": 5}),
    GoldenRun("local", "tiny", ("site_a", "site_b"), overrides=PATCH_16),
    GoldenRun("asymfedavg", "fednnunet", ("site_a", "site_c"), overrides=PATCH_16, training_cases={"site_c": 5}),
    GoldenRun("flames", "flames", ("mri_a", "mri_b", "us_breast"), configuration="2d", overrides=PATCH_2D),
    GoldenRun("mixmfl", "mixmfl", ("site1", "site2", "site6"),
              overrides={**PATCH_16, "memory_size": "40", "prototypes": "4"}, training_cases={"site2": 6}),
    GoldenRun("fedmsa", "fedfms", ("site_a", "site_b"), configuration="2d", overrides={**PATCH_2D, "sam.config": "tiny"},
              training_cases={"site_b": 7}),
    GoldenRun("fedsam", "fedfms", ("site_a", "site_b"), configuration="2d", overrides={**PATCH_2D, "sam.config": "tiny"},
              training_cases={"site_b": 7}),
)


def make_sites(run: GoldenRun, root: Path) -> Path:
    """The run's sites, copied out of the whole preset (generated once per preset under root)."""
    from fedseg.synth import generate

    preset_dir = root / "presets" / run.preset
    if not preset_dir.is_dir():
        generate(preset_dir, preset=run.preset, seed=SEED)
    sites = root / "sites" / run.strategy
    for name in run.sites:
        shutil.copytree(preset_dir / name, sites / name)
        if name in run.training_cases:
            keep_training_cases(sites / name, run.training_cases[name])
    return sites


def keep_training_cases(site_dir: Path, n: int) -> None:
    """Delete the site's training cases after the first n (images and labels) and say so in dataset.json."""
    dataset = json.loads((site_dir / "dataset.json").read_text())
    labels = sorted((site_dir / "labelsTr").iterdir())
    for label in labels[n:]:
        case_id = label.name[: -len(dataset["file_ending"])]
        for image in (site_dir / "imagesTr").glob(f"{case_id}_*"):
            image.unlink()
        label.unlink()
    dataset["numTraining"] = n
    (site_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))


def run_round(run: GoldenRun, sites_root: Path, run_dir: Path) -> None:
    """Fingerprint, plan, init, train every site once, aggregate: round_000 and round_001 in run_dir."""
    from fedseg.data.dataset import load_dataset
    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.run_setup import as_stored, init_run, plan_run
    from fedseg.federation.site_training import run_site_round
    from fedseg.planning.fingerprint import compute_fingerprint

    site_dirs = {name: sites_root / name for name in run.sites}
    fingerprints = [as_stored(compute_fingerprint(load_dataset(path), name)) for name, path in site_dirs.items()]
    plans = plan_run(fingerprints, strategy=run.strategy, rounds=1, configuration=run.configuration,
                     iterations=ITERATIONS, overrides=run.overrides, seed=SEED)
    plans = init_run(run_dir, plans)
    updates = []
    for name, path in site_dirs.items():
        update = run_dir / "round_001" / "updates" / f"{name}.safetensors"
        run_site_round(plans, name, path, run_dir / "round_000" / f"{name}.safetensors", run_dir / "state" / name,
                       update, iterations=ITERATIONS, device="cpu", num_workers=0)
        updates.append(update)
    aggregate_round(plans, updates, run_dir / "round_001")


def tensor_digest(name: str, array: np.ndarray) -> dict:
    """What identifies a tensor: shape, dtype, the sha256 of its bytes (C order) and, for a float
    tensor, three float64 statistics that a tolerance can compare (see test_golden.py): the sum,
    the L2 norm and the projection on a fixed random direction (seeded by the tensor's name),
    which also moves when values are permuted or change sign."""
    data = np.ascontiguousarray(array)
    digest = {"shape": list(data.shape), "dtype": str(data.dtype), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    if np.issubdtype(data.dtype, np.floating):
        values = data.astype(np.float64).ravel()
        direction = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(values.size)
        digest["stats"] = [float(values.sum()), float(np.sqrt(values @ values)), float(values @ direction)]
    return digest


def run_digests(run_dir: Path) -> dict[str, dict[str, dict]]:
    """Every weight file of round_000 and round_001 (relative path) -> tensor name -> digest."""
    from fedseg.federation.weightfile import read_weight_file

    out: dict[str, dict[str, dict]] = {}
    for round_name in ("round_000", "round_001"):
        for path in sorted((run_dir / round_name).rglob("*.safetensors")):
            tensors, _meta = read_weight_file(path)
            out[path.relative_to(run_dir).as_posix()] = {name: tensor_digest(name, tensors[name]) for name in sorted(tensors)}
    return out


def golden_digests(root: Path, runs: tuple[GoldenRun, ...] = RUNS) -> dict[str, dict]:
    """strategy -> digests of its run, every run made under root, on one torch thread.

    One thread because the bits depend on the thread count: with 2 threads, float sums are
    reordered and about half the trained tensors differ in their last bits (more on biases that
    an instance norm cancels, whose gradient is rounding noise). On one thread the runs are
    bit-identical from run to run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for run in runs:
            sites = make_sites(run, root)
            run_dir = root / "runs" / run.strategy
            run_round(run, sites, run_dir)
            out[run.strategy] = run_digests(run_dir)
        return out
    finally:
        torch.set_num_threads(threads)


def identities(digests: dict[str, dict]) -> dict[str, dict]:
    """The exact part of the digests (shape, dtype, sha256): the statistics are computed with
    numpy's BLAS, whose own threads may round their last bits differently."""
    return {strategy: {file: {name: (d["shape"], d["dtype"], d["sha256"]) for name, d in tensors.items()}
                       for file, tensors in files.items()} for strategy, files in digests.items()}


def machine_signature() -> str:
    """What decides the last bits of a trained tensor on one thread: the CPU's vector unit, as
    torch uses it, and the processor model (e.g. "AVX512-Intel-R-Xeon-R-Processor")."""
    import torch  # lazily: collecting the tests must not need torch

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), "")
    model = model or platform.processor() or platform.machine()
    return f"{torch.backends.cpu.get_cpu_capability()}-{re.sub(r'[^A-Za-z0-9]+', '-', model).strip('-')}"


def machine_file(signature: str) -> Path:
    """The record of the golden runs as made on machines of `signature` (beside the main record)."""
    return GOLDEN_FILE.with_name(f"tensors-{signature}.json")


def golden_files() -> list[Path]:
    """The main record first, then one per other machine."""
    return [GOLDEN_FILE, *sorted(GOLDEN_FILE.parent.glob("tensors-*.json"))]


def load_golden(path: Path = GOLDEN_FILE) -> dict[str, dict]:
    return json.loads(path.read_text())


def save_golden(digests: dict[str, dict], path: Path = GOLDEN_FILE) -> None:
    """One line per tensor (the file is large: keep its diff readable), statistics to 8 digits."""
    lines = ["{"]
    for i, (strategy, files) in enumerate(sorted(digests.items())):
        lines.append(f" {json.dumps(strategy)}: {{")
        for j, (file, tensors) in enumerate(sorted(files.items())):
            lines.append(f"  {json.dumps(file)}: {{")
            for k, (name, digest) in enumerate(sorted(tensors.items())):
                rounded = {**digest, **({"stats": [float(f"{v:.8g}") for v in digest["stats"]]} if "stats" in digest else {})}
                comma = "," if k < len(tensors) - 1 else ""
                lines.append(f"   {json.dumps(name)}: {json.dumps(rounded, separators=(',', ':'))}{comma}")
            lines.append("  }" + ("," if j < len(files) - 1 else ""))
        lines.append(" }" + ("," if i < len(digests) - 1 else ""))
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")

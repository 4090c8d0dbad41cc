"""Aggregation speed: `fedseg aggregate` vs Flower's aggregate() vs a streaming numpy floor.

Same update files for all three, in one run:

- **fedseg**: the CLI, `fedseg aggregate --plans ... -o ...` (validation: BLAKE3 content hash
  and finite/norm pass, FedAvg in float64, writing the model, the report), start-up
  included; once for an unsigned plan and once for a plan with Ed25519 keys (signatures of
  the 10 updates checked, the outputs signed).
- **Flower**: what a Flower server does with the same files: load every update with
  `safetensors.safe_open(framework="numpy")`, weight by its `n_cases` and call
  `flwr.server.strategy.aggregate.aggregate()` (run with the interpreter of a venv that has
  flwr; it is not a fedseg dependency).
- **floor**: read + mean + write: a plain key-by-key float64 weighted mean over memory-mapped
  files (numpy only, no checks), cast to float32 and written to one file (fsync'd), as
  fedseg writes its model: the least any aggregator must do.

The network is nnU-Net's 3d_fullres PlainConvUNet for a 128³ patch (6 stages, 32..320
features, ~31M parameters, 124 MB of float32 per update). Update files are made once under
WORK (about 7.5 GB for 50 unsigned + 10 signed sites, about 2 minutes) and reused. Each method runs REPEAT
times as a subprocess, the methods taking turns (a run of each, REPEAT times), with bytecode
cached under WORK as an installed package has it; the best time is reported, with peak
resident memory of the process (RSS, includes memory-mapped file pages) and peak anonymous
memory (what it allocated).
A breakdown in one process shows what validation's hashing and the signature checks cost
(`file_sha256_1thread_s`: the sha256 of the input bytes, which fedseg no longer computes for
format-version-2 updates; measured for reference).
Memory growth is measured from SITES to MANY sites (one run each).

    nice .venv/bin/python benchmarks/aggregate_speed.py --flwr-python /path/to/flwr_venv/bin/python

Give the Flower peer the same numpy as fedseg (e.g. fedseg's own venv with the `flower` extra).

Runs by hand (about 1.5 minutes once the files exist, on 2 loaded cores); prints the ratios last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Measured, load_average, run_measured  # noqa: E402

FEATURES = [32, 64, 128, 256, 320, 320]


# ---------------------------------------------------------------------------------------
# the peers, run as subprocesses of this script (`flower` in flwr's venv, `floor` here)
# ---------------------------------------------------------------------------------------
def flower(paths: list[str]) -> None:
    """Flower's path: safetensors load of every update, then aggregate(); prints its own time."""
    from flwr.server.strategy.aggregate import aggregate
    from safetensors import safe_open

    start = time.perf_counter()
    results = []
    names: list[str] | None = None
    for path in paths:
        with safe_open(path, framework="numpy") as handle:
            names = names or sorted(handle.keys())
            n_cases = json.loads(handle.metadata()["n_cases"])
            results.append(([handle.get_tensor(n) for n in names], n_cases))
    loaded = time.perf_counter()
    averaged = aggregate(results)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "aggregate_s": done - loaded, "n_values": sum(a.size for a in averaged)}))


def _mapped(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with open(path, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    meta = header.pop("__metadata__")
    arrays = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        arrays[name] = raw[8 + n + begin:8 + n + end].view(np.float32).reshape(entry["shape"])
    return arrays, meta


def floor(paths: list[str]) -> None:
    """Key-by-key float64 weighted mean over memory-mapped files, written as float32 to one
    file (fsync'd); prints its own time."""
    target = Path(paths[0]).parent.parent / "floor_out.bin"
    start = time.perf_counter()
    files = [_mapped(p) for p in paths]
    weights = np.array([json.loads(meta["n_cases"]) for _, meta in files], dtype=np.float64)
    weights /= weights.sum()
    out = {}
    for name in sorted(files[0][0]):
        acc = files[0][0][name] * weights[0]          # float32 * float64 scalar -> float64
        for (arrays, _), w in zip(files[1:], weights[1:]):
            acc += arrays[name] * w
        out[name] = acc.astype(np.float32)
    with open(target, "wb") as handle:
        for name in sorted(out):
            handle.write(out[name].data)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    target.unlink()
    print(json.dumps({"mean_s": seconds, "n_values": sum(a.size for a in out.values())}))


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
def _plans(n_sites: int, keys: dict[str, str] | None):
    from fedseg.federation.plan_building import attach_manifests
    from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec

    n = len(FEATURES)
    network = NetworkSpec(n, FEATURES, [[3, 3, 3]] * n, [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), [2] * n, [2] * (n - 1))
    config = ConfigurationPlan("3d_fullres", [1.0, 1.0, 1.0], [128, 128, 128], [128.0, 128.0, 128.0], 2,
                               ["ZScoreNormalization"], [False], network)
    sites = {f"site{i:02d}": SiteInfo("MRI", ["T1"], 5 + 3 * i) for i in range(n_sites)}
    plans = Plans("aggspeed", {"0": "T1"}, {"background": 0, "fg": 1}, ".nii.gz", {}, sites,
                  StrategySpec("fedavg", {"min_sites": 1}), {"3d_fullres": config}, "3d_fullres", keys=dict(keys or {}))
    return attach_manifests(plans)


def make(folder: Path, n_sites: int, signed: bool, seed: int = 0) -> None:
    """plans.json, updates/<site>.safetensors (+ .sig and keys/ when signed); skipped if present."""
    from fedseg.federation.site_update import write_site_update
    from fedseg.federation.manifest import expected_parameters
    from fedseg.federation.signing import COORDINATOR, generate_key, load_public_keys, load_signing_key

    if (folder / "done").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    keys = None
    if signed:
        for signer in [f"site{i:02d}" for i in range(n_sites)] + [COORDINATOR]:
            generate_key(signer, folder / "keys")
        keys = load_public_keys(folder / "keys")
    plans = _plans(n_sites, keys)
    plans.save(folder / "plans.json")
    rng = np.random.default_rng(seed)
    for site in sorted(plans.sites):
        state = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.05)
                 for name, (shape, _dtype) in expected_parameters(plans, site).items()}
        key = load_signing_key(folder / "keys" / f"{site}.key") if signed else None
        write_site_update(plans, site, state, folder / "updates" / f"{site}.safetensors", round_index=1,
                          n_iterations=250, signing_key=key)
    (folder / "done").write_text("")


# ---------------------------------------------------------------------------------------
# in-process breakdown of fedseg's checks
# ---------------------------------------------------------------------------------------
def breakdown(folder: Path, n: int) -> None:
    """Time each check separately (single-threaded unless said), on one process; prints JSON."""
    import hashlib

    from fedseg.federation.aggregation import aggregate_round
    from fedseg.federation.signing import COORDINATOR, load_signing_key, verify_signature, write_signature
    from fedseg.federation.data_pass import sum_of_squares
    from fedseg.federation.validation import validate_updates
    from fedseg.federation.weightfile import ContentHasher, open_reader
    from fedseg.planning.plans import load_plans

    plans = load_plans(folder / "plans.json")
    paths = sorted((folder / "updates").glob("*.safetensors"))[:n]
    readers = [open_reader(p) for p in paths]
    for r in readers:
        r.map()
    out: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - start

    def content_hashes() -> None:
        for r in readers:
            h = ContentHasher(r.meta)
            for name, array in r.iter_tensors():
                h.add(name, array)
            h.hexdigest()

    timed("read_pages_s", lambda: [int(np.bitwise_xor.reduce(r.map()[::4096])) for r in readers])
    timed("content_hash_1thread_s", content_hashes)
    timed("file_sha256_1thread_s", lambda: [hashlib.sha256(r.map()).hexdigest() for r in readers])
    timed("finite_norm_1thread_s", lambda: [
        sum_of_squares(name, a, r.path) for r in readers for name, a in r.iter_tensors()])
    if plans.keys:
        timed("signature_verify_s", lambda: [
            verify_signature(plans.keys, r.path, r.meta.content_hash, r.meta.site) for r in readers])
        key = load_signing_key(folder / "keys" / f"{COORDINATOR}.key")
        scratch = folder / "scratch_sig_target"
        timed("signature_write_x11_s", lambda: [
            write_signature(scratch, key, "0" * 64, "0" * 64) for _ in range(n + 1)])
        scratch.with_name(scratch.name + ".sig").unlink()
    else:
        key = None
    timed("validate_updates_s", lambda: validate_updates(plans, paths))
    target = folder / "scratch_round"
    timed("aggregate_round_s", lambda: aggregate_round(plans, paths, target, signing_key=key))
    shutil.rmtree(target)
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def best(runs: list[Measured]) -> Measured:
    return min(runs, key=lambda m: m.seconds)


def round_robin(runs: dict[str, tuple[list[str], int, Path | None]], env: dict[str, str]) -> dict[str, Measured]:
    """{method: (command, times, folder to clear before each run)} -> each method's best run.
    The methods take turns, one run each per turn: on a shared machine the other jobs come
    and go, and every method then meets the same mix of them."""
    measured: dict[str, list[Measured]] = {key: [] for key in runs}
    for turn in range(max(times for _cmd, times, _clear in runs.values())):
        for key, (cmd, times, clear) in runs.items():
            if turn >= times:
                continue
            if clear is not None:
                shutil.rmtree(clear, ignore_errors=True)
            measured[key].append(run_measured(cmd, env=env))
    for _cmd, _times, clear in runs.values():
        if clear is not None:
            shutil.rmtree(clear, ignore_errors=True)
    return {key: best(found) for key, found in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flwr-python", type=Path, required=True, help="python of a venv with flwr and safetensors")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedseg_aggregate_speed"))
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--many", type=int, default=50, help="sites of the memory-growth run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    me = [sys.executable, str(Path(__file__).resolve())]
    fedseg_cli = str(Path(sys.executable).with_name("fedseg"))
    n, n2 = args.sites, args.many
    plain, signed = args.work / "plain", args.work / "signed"
    start = time.perf_counter()
    make(plain, n2, signed=False)
    make(signed, n, signed=True)
    made = time.perf_counter() - start
    plain_updates = [str(p) for p in sorted((plain / "updates").glob("*.safetensors"))]
    signed_updates = [str(p) for p in sorted((signed / "updates").glob("*.safetensors"))]
    size_mb = os.path.getsize(plain_updates[0]) / 1e6
    print(f"inputs ready in {made:.1f} s: updates of {size_mb:.1f} MB under {args.work}; load {load_average()}")

    # Every method runs with its bytecode cached (under WORK), as an installed package runs (pip
    # compiles it): a shell with PYTHONDONTWRITEBYTECODE would have fedseg compile its ~60
    # modules from source at every start (~0.08 s), which no deployment does.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(args.work / "pycache")

    # warm the page cache for every method alike
    for p in plain_updates + signed_updates:
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)

    out = args.work / "out"

    def cli(folder: Path, updates: list[str], key: bool) -> list[str]:
        cmd = [fedseg_cli, "aggregate", "--plans", str(folder / "plans.json"), *updates, "-o", str(out), "--quiet"]
        return cmd + (["--key", str(folder / "keys" / "coordinator.key")] if key else [])

    results = round_robin({
        "fedseg": (cli(plain, plain_updates[:n], key=False), args.repeat, out),
        "fedseg_signed": (cli(signed, signed_updates, key=True), args.repeat, out),
        "fedseg_2x_sites": (cli(plain, plain_updates, key=False), 1, out),
        "flower": ([str(args.flwr_python), *me[1:], "flower", *plain_updates[:n]], args.repeat, None),
        "floor": ([*me, "floor", *plain_updates[:n]], args.repeat, None),
    }, env)
    inner = {k: json.loads(results[k].stdout) for k in ("flower", "floor")}
    parts_plain = json.loads(run_measured([*me, "breakdown", str(plain), str(n)], env=env).stdout)
    parts_signed = json.loads(run_measured([*me, "breakdown", str(signed), str(n)], env=env).stdout)

    print(f"{n} updates of {size_mb:.1f} MB ({inner['floor']['n_values'] / 1e6:.1f}M float32 parameters); "
          f"best of {args.repeat}; load after: {load_average()}")
    print(f"{'method':<34} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12} {'peak anon MB':>13}")
    labels = {
        "fedseg": f"fedseg aggregate ({n} sites)",
        "fedseg_signed": f"fedseg aggregate, signed ({n} sites)",
        "fedseg_2x_sites": f"fedseg aggregate ({n2} sites)",
        "flower": "Flower: safetensors + aggregate()",
        "floor": "floor: read + mean + write",
    }
    for key, label in labels.items():
        m = results[key]
        print(f"{label:<34} {m.seconds:>7.2f} {m.cpu_seconds:>7.2f} {m.peak_rss_mb:>12.0f} {m.peak_anon_mb:>13.0f}")
    print(f"inside the process: Flower load {inner['flower']['load_s']:.2f} s + aggregate() "
          f"{inner['flower']['aggregate_s']:.2f} s; floor read + mean + write {inner['floor']['mean_s']:.2f} s")
    print("breakdown, one process (s): " + ", ".join(f"{k} {v:.3f}" for k, v in parts_plain.items()))
    print("breakdown, signed plan (s): " + ", ".join(f"{k} {v:.3f}" for k, v in parts_signed.items()))
    growth = results["fedseg_2x_sites"].peak_anon_mb - results["fedseg"].peak_anon_mb
    print(f"peak anonymous memory growth from {n} to {n2} sites: {growth:.0f} MB (one model: {size_mb:.0f} MB)")
    # Flower and the floor are timed inside their process (no interpreter start-up); fedseg's
    # CLI wall time includes its start-up, so the ratios are conservative for fedseg
    fed, fed_signed = results["fedseg"].seconds, results["fedseg_signed"].seconds
    fl = inner["flower"]["load_s"] + inner["flower"]["aggregate_s"]
    fo = inner["floor"]["mean_s"]
    # the floor as a whole process too (start-up included), like fedseg's CLI
    fo_cli = results["floor"].seconds
    print(f"ratio: fedseg CLI is {fl / fed:.2f}x faster than Flower in-process (target >= 2), signed {fl / fed_signed:.2f}x; "
          f"fedseg CLI / floor CLI = {fed / fo_cli:.2f} (target <= 1.3), signed {fed_signed / fo_cli:.2f}; "
          f"in-process aggregate_round / in-process floor = {parts_plain['aggregate_round_s'] / fo:.2f}, "
          f"signed {parts_signed['aggregate_round_s'] / fo:.2f}")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("flower", "floor"):
        {"flower": flower, "floor": floor}[sys.argv[1]](sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "breakdown":
        breakdown(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()

"""Start-up cost: the command line and the coordinator's aggregate never import training code.

A coordinator machine aggregates hundreds of MB per round and may not even have torch
installed; `fedseg --help` must answer at once. Each check runs in a fresh interpreter,
because the test process itself may have imported torch already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedseg.federation.routes import attach_routes
from fedseg.federation.site_update import write_site_update
from fedseg.planning.plans import ConfigurationPlan, NetworkSpec, Plans, SiteInfo, StrategySpec

MANIFEST = {
    "encoder.stages.0.conv.weight": {"shape": [4, 1, 3, 3, 3], "dtype": "float32"},
    "encoder.stages.0.conv.bias": {"shape": [4], "dtype": "float32"},
}
# names of training code that `--help` and `aggregate` must leave unimported
HEAVY = ("torch", "fedseg.training", "SimpleITK", "nibabel")
# ...except the model recipes' torch-free traits and parameters (and the packages holding
# them, which import nothing themselves): an aggregation rule reads them to check a plan;
# and the prototype memory's row layout (numpy), by which MixMFL's rule merges memories
TORCH_FREE = ("fedseg.training", "fedseg.training.recipes", "fedseg.training.recipes.params",
              "fedseg.training.recipes.traits", "fedseg.training.prototype_memory")


def _fresh_interpreter(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


_REPORT = (
    "import json, sys\n"
    f"heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in {HEAVY!r})\n"
    f"               and m not in {TORCH_FREE!r})\n"
    "print(json.dumps({'code': code, 'heavy': heavy}))\n"
)


def _plans() -> Plans:
    network = NetworkSpec(1, [4], [[3, 3, 3]], [[1, 1, 1]], [1], [])
    config = ConfigurationPlan("3d_fullres", [1.0, 1.0, 1.0], [16, 16, 16], [16.0, 16.0, 16.0], 2,
                               ["ZScoreNormalization"], [False], network)
    return attach_routes(Plans("startup", {"0": "T1"}, {"background": 0, "fg": 1}, ".nii.gz", {},
                 {s: SiteInfo("MRI", ["T1"], n) for s, n in (("A", 3), ("B", 5))}, StrategySpec("fedavg"),
                 {"3d_fullres": config}, "3d_fullres", extra={"manifests": {"3d_fullres": MANIFEST}}))


def test_help_imports_no_training_code() -> None:
    code = (
        "import io, contextlib\n"
        "from fedseg.cli.main import run\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    code = run(['--help'])\n" + _REPORT
    )
    result = _fresh_interpreter(code)
    assert result == {"code": 0, "heavy": []}


def test_aggregate_imports_no_training_code(tmp_path: Path) -> None:
    plans = _plans()
    plans.save(tmp_path / "plans.json")
    rng = np.random.default_rng(0)
    updates = []
    for site in sorted(plans.sites):
        state = {n: rng.standard_normal(e["shape"]).astype(np.float32) for n, e in MANIFEST.items()}
        path = tmp_path / "round_001" / "updates" / f"{site}.safetensors"
        write_site_update(plans, site, state, path, round_index=1, n_iterations=1)
        updates.append(str(path))
    args = ["aggregate", "--plans", str(tmp_path / "plans.json"), *updates, "-o", str(tmp_path / "round_001"), "--quiet"]
    code = f"from fedseg.cli.main import run\ncode = run({args!r})\n" + _REPORT
    result = _fresh_interpreter(code)
    assert result == {"code": 0, "heavy": []}
    assert (tmp_path / "round_001" / "aggregate.json").is_file()


def test_the_torch_free_recipe_modules_import_nothing_heavy() -> None:
    code = "".join(f"import {name}\n" for name in TORCH_FREE) + "code = 0\n" + _REPORT
    assert _fresh_interpreter(code) == {"code": 0, "heavy": []}

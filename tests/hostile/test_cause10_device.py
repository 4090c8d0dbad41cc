"""--device: auto by default (CUDA when torch sees one), a GPU this torch lacks is the user's
fault (exit 2, one line, nothing written), and on CUDA training runs in mixed precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_inputs import listing, refused

from fedseg.errors import InputError
from fedseg.training import device as device_mod
from fedseg.training.device import autocast, check_device_name, grad_scaler, resolve_device


def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# -- selection --------------------------------------------------------------------------------
def test_auto_is_the_cpu_without_a_gpu_and_cuda_with_one(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpu(monkeypatch)
    assert resolve_device("auto") == "cpu"
    two_gpus(monkeypatch)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_user_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpu(monkeypatch)
    with pytest.raises(InputError, match=f"--device {name}: torch .* use --device cpu"):
        resolve_device(name)


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    two_gpus(monkeypatch)
    with pytest.raises(InputError, match="--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:-1", "mps", "cpu ", ""])
def test_unknown_device_names_are_refused_without_torch(name: str) -> None:
    with pytest.raises(InputError, match="--device must be auto, cpu, cuda or cuda:N"):
        check_device_name(name)


# -- what changes on CUDA -------------------------------------------------------------------------
def test_cpu_trains_in_float32_without_a_scaler() -> None:
    assert grad_scaler("cpu") is None
    with autocast("cpu"):
        y = torch.nn.Linear(3, 2)(torch.ones(1, 3))
    assert y.dtype == torch.float32


def test_cuda_gets_autocast_float16_a_grad_scaler_and_cudnn_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    made = {}

    def fake_autocast(device_type, dtype):
        made["autocast"] = (device_type, dtype)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", fake_autocast)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: ("scaler", device))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with autocast("cuda:1"):
        pass
    assert made["autocast"] == ("cuda", torch.float16)
    assert grad_scaler("cuda") == ("scaler", "cuda")
    device_mod.configure_backend("cuda")
    assert torch.backends.cudnn.benchmark is True


class RecordingScaler:
    """Stands in for torch.amp.GradScaler: records the order of the calls a CUDA step makes."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.calls: list[str] = []
        self.network = network
        self.grad_norm_at_clip = None

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 1024.0

    def unscale_(self, optimizer):
        self.calls.append("unscale")
        for p in self.network.parameters():
            p.grad /= 1024.0

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def test_a_cuda_step_unscales_before_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's order: scale, backward, unscale, clip, step, update; the step then equals a
    float32 step (the clip norm applies to the true gradients)."""
    from fedseg.training.trainer import SiteTrainer

    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 2)
    scaled = torch.nn.Linear(4, 2)
    scaled.load_state_dict(reference.state_dict())
    x = torch.randn(8, 4)
    steps = {}
    for name, network, scaler in (("float32", reference, None), ("scaled", scaled, RecordingScaler(scaled))):
        trainer = SiteTrainer.__new__(SiteTrainer)   # only what backward_and_step uses
        trainer.network, trainer.grad_scaler, trainer.grad_clip_norm = network, scaler, 0.01
        trainer.optimizer = torch.optim.SGD(network.parameters(), lr=1.0)
        trainer.optimizer.zero_grad()
        trainer.backward_and_step((network(x) ** 2).sum())
        steps[name] = network.weight.detach().clone()
        if scaler is not None:
            assert scaler.calls == ["scale", "unscale", "step", "update"]
    torch.testing.assert_close(steps["scaled"], steps["float32"])


# -- the command line ---------------------------------------------------------------------------
def test_train_on_cuda_without_a_gpu_exits_2_before_any_work(
    tiny_sites: Path, tiny_plans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
) -> None:
    no_gpu(monkeypatch)
    refused(["train", "--site", "site_a", "--data", str(tiny_sites / "site_a"), "--plans", str(tiny_plans),
             "--weights", str(tmp_path / "w.safetensors"), "--state", str(tmp_path / "state"),
             "-o", str(tmp_path / "update.safetensors"), "--device", "cuda"], capsys, "--device cuda")
    assert listing(tmp_path) == set()


def test_predict_on_cuda_without_a_gpu_exits_2(tiny_sites: Path, tiny_plans: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    no_gpu(monkeypatch)
    refused(["predict", "--plans", str(tiny_plans), "--weights", str(tmp_path / "w.safetensors"),
             "-i", str(tiny_sites / "site_a" / "imagesTs"), "-o", str(tmp_path / "pred"), "--device", "cuda:0"],
            capsys, "--device cuda:0")
    assert listing(tmp_path) == set()


def test_simulate_on_cuda_without_a_gpu_writes_nothing(tiny_sites: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    no_gpu(monkeypatch)
    refused(["simulate", str(tiny_sites), "-o", str(tmp_path / "run"), "--device", "cuda"], capsys, "--device cuda")
    refused(["simulate", str(tiny_sites), "-o", str(tmp_path / "run"), "--device", "gpu"], capsys, "--device", "gpu")
    assert listing(tmp_path) == set()


def test_auto_is_the_default_of_every_command_that_computes() -> None:
    import inspect

    from fedseg.cli import flower_commands, model_commands, simulate_command

    for command in (model_commands.train, model_commands.predict, simulate_command.simulate,
                    flower_commands.simulate, flower_commands.join):
        assert inspect.signature(command).parameters["device"].default.default == "auto", command.__name__


def test_an_unknown_precision_exits_2_before_any_work(tiny_sites: Path, tiny_plans: Path, tmp_path: Path, capsys) -> None:
    refused(["train", "--site", "site_a", "--data", str(tiny_sites / "site_a"), "--plans", str(tiny_plans),
             "--weights", str(tmp_path / "w.safetensors"), "--state", str(tmp_path / "state"),
             "-o", str(tmp_path / "update.safetensors"), "--precision", "fp16"], capsys, "--precision", "fp16")
    refused(["predict", "--plans", str(tiny_plans), "--weights", str(tmp_path / "w.safetensors"),
             "-i", str(tiny_sites / "site_a" / "imagesTs"), "-o", str(tmp_path / "pred"), "--precision", "half"],
            capsys, "--precision", "half")
    refused(["simulate", str(tiny_sites), "-o", str(tmp_path / "run"), "--precision", "bfloat16"], capsys, "bfloat16")
    refused(["validate", "--site", "site_a", "--data", str(tiny_sites / "site_a"), "--run", str(tmp_path),
             "--fold", "0", "-o", str(tmp_path / "v.json"), "--precision", "int8"], capsys, "int8")
    assert listing(tmp_path) == set()


def test_auto_precision_is_the_default_of_every_command_that_computes() -> None:
    import inspect

    from fedseg.cli import flower_commands, model_commands, selection_commands, simulate_command

    for command in (model_commands.train, model_commands.predict, simulate_command.simulate, selection_commands.validate,
                    flower_commands.simulate, flower_commands.join):
        assert inspect.signature(command).parameters["precision"].default.default == "auto", command.__name__


def test_budget_reaches_the_plan_of_simulate(tiny_fingerprints: list[Path]) -> None:
    """`simulate --budget` plans as `plan --budget` does (a larger budget, a larger patch)."""
    from fedseg.federation.run_setup import plan_run
    from fedseg.planning.fingerprint import load_fingerprint

    fps = [load_fingerprint(p) for p in tiny_fingerprints]
    common = dict(strategy="fedavg", rounds=1, configuration="3d_fullres", iterations=None, overrides={}, seed=1)
    small = plan_run(fps, budget=0.01, **common)
    large = plan_run(fps, budget=8.0, **common)
    assert small.extra["planning"]["budget"] == 0.01 and large.extra["planning"]["budget"] == 8.0
    volume = lambda plans: torch.tensor(plans.configuration_for(None).patch_size).prod().item()  # noqa: E731
    assert volume(small) < volume(large)


def test_simulate_refuses_a_bad_budget_writing_nothing(tiny_sites: Path, tmp_path: Path, capsys) -> None:
    refused(["simulate", str(tiny_sites), "-o", str(tmp_path / "run"), "-q", "--budget", "0"], capsys, "--budget")
    assert listing(tmp_path) == set()


def test_the_makefile_keeps_the_torch_index_out_of_the_requirement(tmp_path: Path) -> None:
    """`make install TORCH_INDEX=URL` passes the URL as --index-url, never inside the quoted
    requirement (which pip would read as a malformed requirement); empty by default."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[2]

    def torch_line(*args: str) -> str:
        out = subprocess.run(["make", "-n", "-C", str(root), "venv", f"VENV={tmp_path / 'venv'}", *args],
                             capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if "pip install" in line and "torch" in line and not line.startswith("#"))

    assert torch_line().split() == [f"{tmp_path / 'venv'}/bin/pip", "install", '"torch==2.13.0"']
    url = "https://download.pytorch.org/whl/cu128"
    assert torch_line(f"TORCH_INDEX={url}").split()[2:] == ['"torch==2.13.0"', "--index-url", f'"{url}"']

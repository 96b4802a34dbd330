"""Start-up checks that turn a wrong environment into a clear exit 2 instead of a silent change:
dependency versions outside the tested ranges, and GPUs allocated but CUDA unusable."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from mythos_scale.config import ConfigError
from mythos_scale.parallel import distributed
from mythos_scale.parallel.distributed import LaunchError, allocated_gpus, select_device
from mythos_scale.train import train_cli
from mythos_scale.versions import ALLOW_UNTESTED_ENV, TESTED, requirement, untested_versions

from conftest import REPO, TINY_TRAIN, subprocess_env


def _tested() -> dict[str, str]:
    return {package: low for package, (low, _, _) in TESTED.items()}


def test_installed_versions_are_the_tested_ones():
    assert untested_versions() == []


@pytest.mark.parametrize("version, ok", [("2.14", True), ("2.14.1+cu130", True), ("2.13.9", False), ("2.15.0", False),
                                         (None, False)])
def test_versions_outside_the_range_are_named(version, ok):
    problems = untested_versions({**_tested(), "torch": version})
    assert (problems == []) is ok
    if not ok:
        assert len(problems) == 1 and problems[0].startswith("torch") and ">=2.14,<2.15" in problems[0]
        assert ("not installed" in problems[0]) is (version is None)


def test_setup_pins_are_the_checked_ranges():
    assert requirement("deepspeed") == "deepspeed>=0.19.8,<0.20"


def test_train_refuses_untested_versions_unless_allowed(monkeypatch, capsys):
    monkeypatch.setattr(train_cli, "untested_versions", lambda: ["deepspeed 0.16.0 is installed, tested: >=0.19.8,<0.20"])
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"deepspeed 0.16.0 is installed.*{ALLOW_UNTESTED_ENV}=1"):
        train_cli.check_versions()
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    train_cli.check_versions()
    assert "warning: untested versions" in capsys.readouterr().err


# ------------------------------------------------------------------ GPUs allocated, CUDA unusable

@pytest.fixture
def no_usable_cuda(monkeypatch):
    """A node whose torch cannot use its GPUs (as with a wheel built for a newer driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "NVIDIA_DEVICE_FILES", ())
    return monkeypatch


@pytest.mark.parametrize("env", [{"SLURM_GPUS_ON_NODE": "8"}, {"SLURM_JOB_GPUS": "0"}, {"SLURM_STEP_GPUS": "0,1"}])
def test_allocated_gpus_without_cuda_are_an_error(no_usable_cuda, env):
    for name, value in env.items():
        no_usable_cuda.setenv(name, value)
    with pytest.raises(LaunchError, match=f"GPUs were allocated \\({next(iter(env))}=.*parallel.device=cpu"):
        select_device("auto", 0)
    assert select_device("cpu", 0) == torch.device("cpu")  # the CPU on purpose


def test_a_driver_without_usable_cuda_is_an_error(no_usable_cuda, tmp_path):
    (tmp_path / "nvidia0").touch()  # what the NVIDIA kernel driver creates
    no_usable_cuda.setattr(distributed, "NVIDIA_DEVICE_FILES", (str(tmp_path / "nvidia0"),))
    with pytest.raises(LaunchError, match="nvidia0 exists"):
        select_device("auto", 0)


def test_no_gpu_allocated_means_the_cpu_unless_cuda_is_required(no_usable_cuda):
    no_usable_cuda.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # DeepSpeed's launcher sets it on CPU machines too
    no_usable_cuda.setenv("SLURM_GPUS_ON_NODE", "0")
    assert allocated_gpus() is None and select_device("auto", 0) == torch.device("cpu")
    with pytest.raises(LaunchError, match="parallel.device=cuda but"):
        select_device("cuda", 0)


@pytest.mark.slow  # a `mythos train` process
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unusable (here it works)")
def test_train_exits_2_when_gpus_are_allocated_but_cuda_is_unusable(tmp_path):
    env = {**subprocess_env(), "SLURM_JOB_GPUS": "0"}
    cmd = [sys.executable, "-m", "mythos_scale.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           *TINY_TRAIN, f"train.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GPUs were allocated (SLURM_JOB_GPUS=0)" in proc.stderr and "parallel.device=cpu" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------ the Slurm rendezvous port

def _master_port(job_id: int, ephemeral: str, tmp_path) -> subprocess.CompletedProcess:
    (tmp_path / "range").write_text(ephemeral)
    return subprocess.run(["bash", str(REPO / "slurm" / "master_port.sh"), str(job_id)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "MYTHOS_PORT_RANGE_FILE": str(tmp_path / "range")})


def test_master_port_stays_below_the_ephemeral_range(tmp_path):
    ports = {job: int(_master_port(job, "32768\t60999\n", tmp_path).stdout) for job in (0, 17767, 17768, 2**31 - 1)}
    assert all(15000 <= p < 32768 for p in ports.values()), ports
    assert ports[0] == ports[17768] == 15000 and ports[17767] == 32767  # wraps within the room below the range
    assert int(_master_port(123, "40000 60999", tmp_path).stdout) == 15123  # same job, same port (a requeue)
    low = _master_port(123, "15050 60999", tmp_path)
    assert low.returncode == 2 and "no room below it" in low.stderr


def test_master_port_takes_the_next_when_the_first_is_busy(tmp_path):
    first = int(_master_port(4321, "32768 60999", tmp_path).stdout)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", first))
        busy.listen()
        proc = _master_port(4321, "32768 60999", tmp_path)
        assert proc.returncode == 0 and int(proc.stdout) == first + 1 and f"port {first} is in use" in proc.stderr
        with socket.socket() as also_busy:
            also_busy.bind(("127.0.0.1", first + 1))
            also_busy.listen()
            both = _master_port(4321, "32768 60999", tmp_path)
    assert both.returncode == 2 and "both in use" in both.stderr

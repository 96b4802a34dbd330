"""slurm/pretrain_770m.sh under a real Slurm cluster (munged + slurmctld + slurmd on this machine).

`launch/test.sh` starts the one-node cluster (launch/slurm_local_cluster.sh) before the suite.
The script is submitted as users submit it, with the tiny config: it must train on 2 srun
tasks, and on the pre-timeout signal save, exit 75, requeue itself and resume to the end.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_TRAIN, free_port, subprocess_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="Slurm is not installed: run launch/slurm_local_cluster.sh")]

SCRIPT = REPO / "slurm" / "pretrain_770m.sh"


def _job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def _submit(tmp_path: Path, overrides: list[str]) -> tuple[str, Path]:
    log = tmp_path / "slurm.out"
    env = subprocess_env()
    env.update(CONFIG=str(REPO / "configs" / "tiny_cpu.yaml"), MASTER_PORT=str(free_port()))
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--gpus-per-node=0", "--time=10", f"--output={log}", f"--chdir={REPO}", str(SCRIPT),
           *TINY_TRAIN, f"train.out_dir={tmp_path}", "train.name=r", *overrides]
    job_id = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()
    return job_id.split(";")[0], log


def _wait(predicate, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sbatch_trains_and_requeues_after_preemption_signal(tmp_path, tiny_dataset):
    job, log = _submit(tmp_path, [f"data.sources=[{{path: '{tiny_dataset}'}}]", "train.max_steps=400",
                                  "train.checkpoint.every=100"])
    try:
        _wait(lambda: _steps_logged(tmp_path / "r") >= 2, "the first steps")
        # what Slurm does 5 minutes before the time limit (--signal=B:USR1@300)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        _wait(lambda: _job_field(job, "Restarts") == "1", "the requeue")
        # A requeued job waits AuthInfo cred_expire seconds (set short by slurm_local_cluster.sh).
        _wait(lambda: _job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
              "the requeued job to run and end")
        text = log.read_text()
        assert _job_field(job, "JobState") == "COMPLETED", text[-3000:]
        assert "srun: 2 tasks, 1 CPUs and 1 OpenMP threads each" in text  # from the allocation, passed to srun
        assert "got USR1" in text and "stop requested (SIGUSR1)" in text and "requeueing job" in text
        assert "resumed from step_0000000" in text
        assert "done: 400 steps" in text
    finally:
        subprocess.run(["scancel", job], capture_output=True)

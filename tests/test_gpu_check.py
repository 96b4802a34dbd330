"""launch/gpu_check.sh, the GPU bring-up kit: on a machine without a GPU it refuses to start."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO, subprocess_env


@pytest.mark.slow
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "check"
    env = dict(subprocess_env(), OUT_DIR=str(out), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu_check: no GPU visible (CUDA_VISIBLE_DEVICES=); run it on a GPU node" in result.stderr
    assert not out.exists() and "parity" not in result.stdout  # nothing started, nothing written
    assert os.access(REPO / "launch" / "gpu_check.sh", os.X_OK)

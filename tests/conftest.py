"""Shared fixtures: a small prepared dataset and a way to run real training processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A tiny RDT with every part switched on, small enough for a few steps per second on CPU.
TINY_TRAIN = [
    "model.vocab_size=512", "model.dim=64", "model.n_heads=2", "model.max_seq_len=32",
    "model.prelude_layers=1", "model.core_layers=1", "model.coda_layers=1", "model.max_loops=4",
    "model.dense_ffn_hidden=128", "model.lora_rank=4",
    "model.attention.kv_lora_rank=16", "model.attention.q_lora_rank=24",
    "model.attention.qk_nope_head_dim=16", "model.attention.qk_rope_head_dim=8",
    "model.attention.v_head_dim=16",
    "model.moe.n_routed_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32",
    "model.moe.balance_update_rate=0.01",
    "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
    "train.loops.sampler=poisson", "train.loops.mean=2", "train.loops.min=1", "train.loops.max=4",
    "train.loops.backprop_depth=2", "train.peak_tflops=0.2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def train_command(run_root: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    args = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), *TINY_TRAIN,
            f"train.out_dir={run_root}", *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "mythos_scale.train", *args]
    return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()),
            "--module", "mythos_scale.train", *args]


def run_train(run_root: Path, overrides: list[str], nproc: int = 1, timeout: int = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(run_root, overrides, nproc), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def start_train(run_root: Path, overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    """A training run in the background, in its own session (``os.killpg`` ends all its ranks)."""
    return subprocess.Popen(train_command(run_root, overrides, nproc), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll ``predicate`` while ``proc`` (from :func:`start_train`) runs; kill it on a timeout."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """MDS shards (seq_len 32, vocab 512) prepared by the real CLI from a few stdlib modules."""
    root = tmp_path_factory.mktemp("data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "string.py", "shlex.py"):
        (corpus / name.replace("/", "_")).write_text((stdlib / name).read_text())
    tokenizer = root / "tokenizer.json"
    cli = [sys.executable, "-m", "mythos_scale.cli", "data"]
    env = subprocess_env()
    subprocess.run([*cli, "tokenizer", "--input", str(corpus), "--vocab-size", "512", "--out", str(tokenizer)],
                   check=True, cwd=REPO, env=env, capture_output=True)
    out = root / "shards"
    subprocess.run([*cli, "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--seq-len", "32",
                    "--out", str(out), "--val-fraction", "0.25", "--workers", "1"],
                   check=True, cwd=REPO, env=env, capture_output=True)
    return out

"""TP and EP through the real trainer (``deepspeed`` launcher, gloo ranks, checkpoints on disk),
and the layouts that must be refused.

- Save and resume under TP=2 x EP=2 (4 ranks: data-parallel 2, each expert on one rank): a run
  stopped after 2 steps and resumed in a fresh launch ends bitwise equal to an uninterrupted one:
  every loss, and every tensor of every file of the final checkpoint (the model file of each TP
  rank, ZeRO's optimizer files, each rank's expert shards, RNG and data-loader state).
- A run folder written in one layout is refused, naming the change, by a resume in another.
- Each invalid layout fails at start with a message naming the clashing numbers, exit status 2:
  before any rank starts under ``mythos train`` (the world is known there), on the ranks under
  another launcher.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TRAIN, run_train, subprocess_env

STEPS = 4
LAYOUT = ["parallel.tp=2", "parallel.ep=2"]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["train/loss"] for r in rows}
    return [by_step[s] for s in sorted(by_step)]


# The process-wide generators (Python, NumPy, torch's default) are saved and restored, but each
# launch starts them from the OS's entropy and training draws nothing from them (the model is
# initialized from its own seeded generator): they are not compared.
UNSEEDED_RNG = ("['rng']",)


def _assert_same(a, b, where: str) -> None:
    """Recursive bitwise equality of what torch.load returns (tensors, dicts, sequences, scalars)."""
    if where.endswith(UNSEEDED_RNG):
        return
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's config object
        return
    else:
        assert a == b, where


def _data(tiny_dataset: Path) -> str:
    return f"data.sources=[{{path: '{tiny_dataset}'}}]"


def test_tp2_ep2_resume_is_bitwise_exact(tmp_path, tiny_dataset):
    args = [_data(tiny_dataset), "train.name=r", f"train.max_steps={STEPS}", "train.checkpoint.every=2", *LAYOUT]
    run_train(tmp_path / "straight", args, nproc=4, timeout=600)
    first = run_train(tmp_path / "resumed", [*args, "train.exit_after_steps=2"], nproc=4, timeout=600)
    assert "dp 2, tp 2, ep 2" in first.stdout + first.stderr
    second = run_train(tmp_path / "resumed", args, nproc=4, timeout=600)
    assert "resumed from step_00000002" in second.stdout + second.stderr
    straight, resumed = tmp_path / "straight" / "r", tmp_path / "resumed" / "r"
    assert len(_losses(straight)) == STEPS and _losses(resumed) == _losses(straight)
    tag = "checkpoints/step_00000004"
    files = sorted(p.name for p in (straight / tag).glob("*.pt"))
    assert files == sorted(p.name for p in (resumed / tag).glob("*.pt"))
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(files)  # one per TP rank
    assert len([f for f in files if f.startswith("trainer_rank_")]) == 4
    for name in files:
        a = torch.load(straight / tag / name, map_location="cpu", weights_only=False)
        b = torch.load(resumed / tag / name, map_location="cpu", weights_only=False)
        _assert_same(a, b, name)
    # each EP rank saved its own experts: ranks 0 and 2 (TP rank 0, EP ranks 0 and 1) differ
    shards = [torch.load(straight / tag / f"trainer_rank_{r:05d}.pt", weights_only=False)["expert_shards"]
              for r in (0, 2)]
    assert shards[0].keys() == shards[1].keys() and shards[0]
    assert not any(torch.equal(shards[0][k], shards[1][k]) for k in shards[0])

    # resuming this run folder in another layout (same world size) is refused, naming the change
    from mythos_scale.config import ConfigError, load_config
    from mythos_scale.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # the check reads the run folder and the config only
    trainer.run_dir = resumed
    trainer.cfg = load_config(resumed / "config.yaml", ["parallel.tp=1"])
    with pytest.raises(ConfigError, match=r"parallel.tp: 2 -> 1 \(checkpoints are sharded by the layout"):
        trainer._check_same_model()
    trainer.cfg = load_config(resumed / "config.yaml")
    trainer._check_same_model()


def _front(overrides: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mythos_scale.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           *TINY_TRAIN, *overrides]
    if nproc > 1:
        cmd[3:3] = ["--nproc", str(nproc)]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("nproc, overrides, message", [
    (2, ["parallel.tp=4", "model.n_heads=4"], "parallel.tp=4 does not divide the world size 2"),
    (2, ["parallel.tp=2", "parallel.ep=2"], "parallel.ep=2 exceeds the data-parallel size 1 (world 2 / tp 2)"),
    (3, ["parallel.ep=2"], "parallel.ep=2 does not divide the data-parallel size 3 (world 3 / tp 1)"),
    (1, ["parallel.tp=2", "model.n_heads=3"], "tp (2) must divide model.n_heads (3)"),
    (1, ["parallel.ep=3"], "ep (3) must divide model.moe.n_routed_experts (4)"),
    (1, ["parallel.ep=2", "model.moe.enabled=false"], "ep (2) > 1 needs model.moe.enabled"),
    (1, ["parallel.tp=2", "model.dense_ffn_hidden=127"], "tp (2) must divide model.dense_ffn_hidden (127)"),
    (1, ["parallel.tp=2", "model.attention.type=gqa"], "implemented for model.attention.type=mla only"),
    (1, ["parallel.tp=2"], "parallel.tp=2 does not divide the world size 1"),
])
def test_invalid_layout_refused_before_start(nproc, overrides, message):
    """Refused by ``mythos train`` before torch loads (config) or any rank starts (world)."""
    proc = _front(overrides, nproc)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr


def test_invalid_layout_refused_on_the_ranks(tmp_path):
    """Under another launcher the world is known only on the ranks: they refuse it (status 2)."""
    env = {**subprocess_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    cmd = [sys.executable, "-m", "mythos_scale.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           *TINY_TRAIN, f"train.out_dir={tmp_path}", "parallel.ep=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "parallel.ep=2 exceeds the data-parallel size 1 (world 1 / tp 1)" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing claimed

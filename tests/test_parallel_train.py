"""TP and EP through the real trainer (``deepspeed`` launcher, gloo ranks, checkpoints on disk),
and the layouts that must be refused.

- Save and resume under TP=2 x EP=2 (4 ranks: data-parallel 2, each expert on one rank): a run
  stopped after 2 steps and resumed in a fresh launch ends bitwise equal to an uninterrupted one:
  every loss, and every file of the final checkpoint byte for byte (each rank's pieces of the
  master weights and Adam moments, the balance biases, RNG and data-loader state).
- The same TP=2 x EP=2 checkpoint resumed on 1 rank (TP, EP and ZeRO partitions all resharded)
  continues as an uninterrupted 1-rank run does (1e-4 relative), from the same sample.
- Each invalid layout fails at start with a message naming the clashing numbers, exit status 2:
  before any rank starts under ``mythos train`` (the world is known there), on the ranks under
  another launcher.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mythos_scale.checkpoint import read_checkpoint_info, read_model_state

from conftest import REPO, TINY_TRAIN, run_train, subprocess_env

pytestmark = pytest.mark.slow  # multi-process, DeepSpeed, Slurm or long runs: see pyproject.toml

STEPS = 4
LAYOUT = ["parallel.tp=2", "parallel.ep=2", "parallel.tp_check_every=2"]  # the replica check runs too


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["train/loss"] for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def _record(tag_dir: Path) -> dict:
    return json.loads((tag_dir / "COMPLETE.json").read_text())


def _data(tiny_dataset: Path) -> str:
    return f"data.sources=[{{path: '{tiny_dataset}'}}]"


def test_tp2_ep2_resume_is_exact_and_reshards_to_one_rank(tmp_path, tiny_dataset):
    args = [_data(tiny_dataset), "train.name=r", f"train.max_steps={STEPS}", "train.checkpoint.every=2"]
    run_train(tmp_path / "straight", [*args, *LAYOUT], nproc=4, timeout=600)
    first = run_train(tmp_path / "resumed", [*args, *LAYOUT, "train.exit_after_steps=2"], nproc=4, timeout=600)
    assert "dp 2, tp 2, ep 2" in first.stdout + first.stderr
    shutil.copytree(tmp_path / "resumed", tmp_path / "one_rank")  # the step-2 checkpoint, for the 1-rank resume
    second = run_train(tmp_path / "resumed", [*args, *LAYOUT], nproc=4, timeout=600)
    assert "resumed from step_00000002" in second.stdout + second.stderr
    straight, resumed = tmp_path / "straight" / "r", tmp_path / "resumed" / "r"
    assert len(_losses(straight)) == STEPS and _losses(resumed) == _losses(straight)
    tag = "checkpoints/step_00000004"
    a, b = _record(straight / tag), _record(resumed / tag)
    assert len(a["files"]) == 4 and a["files"] == b["files"]  # every rank's file, byte for byte (size, xxh3)
    assert a["params"] == b["params"]
    # each logical tensor is saved once: TP-split ones by both TP ranks, experts by each EP rank
    # (ranks 0 and 2: TP rank 0 of EP ranks 0 and 1), the replicated rest by TP rank 0 only
    experts = [n for n in a["params"] if n.endswith("experts.w_gate")]
    assert experts
    for name in experts:
        fragments = a["params"][name]["fragments"]
        assert {f[0] for f in fragments} == {"rank_00000.safetensors", "rank_00002.safetensors"}
        assert sorted({f[2] for f in fragments}) == [0, 2]  # offsets along dim 0 of 4 experts
    for name, entry in a["params"].items():
        assert sum(f[-1] for f in entry["fragments"]) == torch.Size(entry["shape"]).numel(), name

    # the step-2 checkpoint of TP=2 x EP=2 resumed on 1 rank, against an uninterrupted 1-rank run
    run_train(tmp_path / "single", args, timeout=600)
    moved = run_train(tmp_path / "one_rank", args, timeout=600)
    assert ("resharded step_00000002 from 4 ranks (dp 2, tp 2, ep 2, ZeRO-1) to 1 rank (dp 1, tp 1, ep 1, "
            "ZeRO-1)") in moved.stderr
    assert "the data continues at sample 8 of the global stream" in moved.stderr
    single, one_rank = _losses(tmp_path / "single" / "r"), _losses(tmp_path / "one_rank" / "r")
    assert one_rank[:2] == _losses(straight)[:2]
    assert max(abs(x - y) / abs(y) for x, y in zip(one_rank[2:], single[2:])) < 1e-4
    final, expected = read_model_state(tmp_path / "one_rank" / "r" / tag), read_model_state(tmp_path / "single" / "r" / tag)
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    info = read_checkpoint_info(tmp_path / "one_rank" / "r" / tag)
    assert info["layout"]["world_size"] == 1 and info["trainer"]["data"]["consumed_samples"] == STEPS * 4


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

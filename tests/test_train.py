"""The trainer, end to end, in real processes: DeepSpeed engines, gloo ranks, checkpoints on disk.

The core equalities: 2 data-parallel ranks (ZeRO-1 and ZeRO-2) equal one process with the
same global batch; a resumed run continues exactly like an uninterrupted one, whether it
stopped on schedule, on SIGTERM, or was killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, run_train, subprocess_env, train_command

STEPS = 16


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["train/loss"] for r in rows}  # a resumed run may repeat steps
    return [by_step[s] for s in sorted(by_step)]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    states = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    return states["module"]


def _data(tiny_dataset: Path) -> str:
    return f"data.sources=[{{path: '{tiny_dataset}'}}]"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_dataset) -> Path:
    """One uninterrupted single-process run of STEPS steps, checkpointing every 4."""
    root = tmp_path_factory.mktemp("straight")
    run_train(root, [_data(tiny_dataset), "train.name=r", f"train.max_steps={STEPS}",
                     "train.checkpoint.every=4"])
    return root / "r"


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_equal_one_process(tmp_path, tiny_dataset, straight_run, zero_stage):
    run_train(tmp_path, [_data(tiny_dataset), "train.name=r", f"train.max_steps={STEPS}",
                         "train.checkpoint.every=100", f"train.zero_stage={zero_stage}"], nproc=2)
    one, two = _losses(straight_run), _losses(tmp_path / "r")
    assert len(two) == STEPS
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    w1, w2 = _final_weights(straight_run), _final_weights(tmp_path / "r")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    # the balance biases moved, identically: expert counts were summed over both ranks
    biases = [n for n in w1 if n.endswith("balance_bias")]
    assert biases and any(w1[n].abs().sum() > 0 for n in biases)


def _assert_same_as_straight(run: Path, straight: Path) -> None:
    assert _losses(run) == _losses(straight)
    w, ref = _final_weights(run), _final_weights(straight)
    for name in ref:
        assert torch.equal(w[name], ref[name]), f"{name} differs after resume"


def test_resume_is_bitwise_exact(tmp_path, tiny_dataset, straight_run):
    args = [_data(tiny_dataset), "train.name=r", f"train.max_steps={STEPS}", "train.checkpoint.every=4"]
    first = run_train(tmp_path, [*args, "train.exit_after_steps=3"])
    assert "run again to continue" in first.stderr + first.stdout
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    second = run_train(tmp_path, args)  # a fresh process resumes from step 3
    assert "resumed from step_00000003" in second.stderr + second.stdout
    _assert_same_as_straight(tmp_path / "r", straight_run)


def _start(run_root: Path, overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(train_command(run_root, overrides, nproc), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_mid_run_then_resumed(tmp_path, tiny_dataset, straight_run, sig):
    args = [_data(tiny_dataset), "train.name=r", f"train.max_steps={STEPS}", "train.checkpoint.every=4"]
    proc = _start(tmp_path, args)
    _wait_for(lambda: _steps_logged(tmp_path / "r") >= 5, proc)  # past the first checkpoint
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    assert _steps_logged(tmp_path / "r") < STEPS, "the run ended before the signal: not a mid-run stop"
    assert proc.returncode == (75 if sig == signal.SIGTERM else -signal.SIGKILL)
    resumed = run_train(tmp_path, args)
    assert "resumed from step_0000000" in resumed.stderr + resumed.stdout
    _assert_same_as_straight(tmp_path / "r", straight_run)


def test_sigterm_saves_and_exits_75_on_every_rank(tmp_path, tiny_dataset):
    args = [_data(tiny_dataset), "train.name=r", "train.max_steps=50", "train.checkpoint.every=100"]
    proc = _start(tmp_path, args, nproc=2)
    _wait_for(lambda: _steps_logged(tmp_path / "r") >= 2, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "mythos_scale.train" in " ".join(p.cmdline())
             and "--local_rank" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)  # one rank only: the stop must still be collective
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    tag = (tmp_path / "r" / "checkpoints" / "latest").read_text().strip()
    step = int(tag.split("_")[1])
    assert 2 <= step < 50
    assert json.loads((tmp_path / "r" / "checkpoints" / tag / "COMPLETE.json").read_text())["world_size"] == 2
    assert "stop requested (SIGTERM)" in output or "signal on another rank" in output


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, tiny_dataset):
    args = [_data(tiny_dataset), "train.name=r", "train.max_steps=4", "train.checkpoint.every=2"]
    run_train(tmp_path, args)
    ckpt = tmp_path / "r" / "checkpoints"
    model_file = ckpt / "step_00000004" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # torn write
    resumed = run_train(tmp_path, [*args, "train.max_steps=5"])
    log = resumed.stderr + resumed.stdout
    assert "step_00000004 cannot be used" in log and "truncated" in log
    assert "resumed from step_00000002" in log


def test_tensorboard_events_hold_the_tags(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lm_loss", "train/lr", "train/grad_norm", "perf/tokens_per_s",
                "perf/tflops_per_device", "perf/mfu", "time/forward_s", "time/backward_s", "loops/T",
                "mem/gib", "train/skipped_steps", "ckpt/save_s"):
        assert tag in tags, tag
    assert any(t.startswith("moe/") for t in tags) and any(t.startswith("model/") for t in tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_plots_are_written(straight_run):
    from PIL import Image

    for name in ("loss", "loss_vs_loops", "expert_load", "state_norms"):
        with Image.open(straight_run / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_loss_goes_down(straight_run):
    losses = _losses(straight_run)
    assert losses[-1] < losses[0]


def test_bad_inputs_fail_clearly_and_touch_nothing(tmp_path, tiny_dataset, straight_run):
    proc = run_train(tmp_path, ["model.moe.top_k=9"], check=False)
    assert proc.returncode == 2 and "model.moe.top_k" in proc.stderr
    proc = run_train(tmp_path, ["data.sources=[{path: /nonexistent/shards}]"], check=False)
    assert proc.returncode == 2 and "/nonexistent/shards" in proc.stderr
    # a run folder made by another model config is refused, and nothing in it changes
    before = {p: p.stat().st_mtime_ns for p in straight_run.rglob("*")}
    proc = run_train(straight_run.parent, [_data(tiny_dataset), "train.name=r", "model.dim=96"], check=False)
    assert proc.returncode == 2 and "different config" in proc.stderr and "model.dim" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in straight_run.rglob("*")} == before


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_dataset):
    # An absurd learning rate: the first update blows the weights up, every later loss is inf/NaN.
    proc = run_train(tmp_path, [_data(tiny_dataset), "train.name=r", "train.max_steps=20", "train.lr=1e30",
                                "train.min_lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
                                "train.max_nonfinite_steps=3"], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows][-3:] == [1, 2, 3]
    assert len(rows) < 20

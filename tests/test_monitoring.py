"""What a run reports while it trains: W&B beside TensorBoard, the console line, perf/* and mem/*."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from wandb_records import history, run_info

from conftest import run_train


def _data(tiny_dataset: Path) -> str:
    return f"data.sources=[{{path: '{tiny_dataset}'}}]"


def _tensorboard(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_wandb_offline_holds_the_tensorboard_scalars_and_keeps_its_id_on_resume(tmp_path, tiny_dataset):
    args = [_data(tiny_dataset), "train.name=r", "train.max_steps=5", "train.checkpoint.every=2",
            "train.wandb.mode=offline", "train.wandb.tags=[tiny, cpu]"]
    first = run_train(tmp_path, [*args, "train.exit_after_steps=3"])
    run_train(tmp_path, args)  # resumes from step 3
    run = tmp_path / "r"
    # the console line: tokens seen (4 x 32 per step), the ETA to max_steps, the process's memory
    assert re.search(r"step 3/5 \| .* \| 384 tok \| ETA \d+s \| rss \d+\.\d\d GiB \(\d+%\)", first.stderr), first.stderr[-2000:]
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    (first_id, tags), (second_id, _) = run_info(files[0]), run_info(files[1])
    assert first_id == second_id == (run / "wandb" / "run_id").read_text().strip()
    assert tags == ["tiny", "cpu"]

    logged: dict[int, dict[str, float]] = {}
    for path in files:  # the second attempt's steps replace the first's (as TensorBoard's purge does)
        for step, values in history(path).items():
            logged.setdefault(step, {}).update(values)
    assert sorted(logged) == [1, 2, 3, 4, 5]
    board = _tensorboard(run)
    assert {"train/loss", "perf/tokens_per_s", "mem/rss_gib", "ckpt/save_s"} <= set(board)
    compared = 0
    for tag, points in board.items():
        for step, value in points.items():
            assert tag in logged[step], (tag, step)
            assert np.float32(logged[step][tag]) == np.float32(value), (tag, step, logged[step][tag], value)
            compared += 1
    assert compared == sum(len(v) for v in logged.values())  # and W&B holds nothing TensorBoard lacks
    for step in (3, 5):  # the ETA is the steps left at the interval's pace
        assert board["perf/eta_s"][step] == pytest.approx((5 - step) * board["perf/step_s"][step], rel=1e-5)
    assert 0 < board["mem/rss_pct"][5] < 100 and board["mem/rss_gib"][5] > 0.1


def test_wandb_without_the_package_is_refused_at_start_up(monkeypatch):
    import importlib.util

    from mythos_scale.config import ConfigError, load_config
    from mythos_scale.train.wandb_log import check_wandb_installed

    cfg = load_config(overrides=["train.wandb.mode=offline"])
    check_wandb_installed(cfg)  # installed here: nothing to say
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="train.wandb is set but the wandb package is not installed"):
        check_wandb_installed(cfg)
    check_wandb_installed(load_config(overrides=["train.wandb.mode=disabled"]))  # disabled needs no package


def test_cuda_memory_is_read_then_reset_each_interval(monkeypatch):
    """The CUDA branch of memory_metrics, on torch.cuda's own functions replaced (no GPU here):
    it reads the interval's peaks and retries, then resets both kinds of counters, in that order."""
    from mythos_scale.train.metrics import memory_metrics

    calls = []
    stats = {"allocated_bytes.all.peak": 3 * 2 ** 30, "reserved_bytes.all.peak": 4 * 2 ** 30,
             "num_alloc_retries": 2, "num_ooms": 0, "allocated_bytes.all.current": 2 ** 30}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: calls.append("read") or stats)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 16 * 2 ** 30}))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append("reset_peak"))
    monkeypatch.setattr(torch.cuda, "reset_accumulated_memory_stats", lambda device: calls.append("reset_accumulated"))
    got = memory_metrics(torch.device("cuda", 0))
    assert got == {"mem/allocated_gib": 3.0, "mem/reserved_gib": 4.0, "mem/reserved_pct": 25.0,
                   "mem/alloc_retries": 2, "mem/ooms": 0}
    assert calls == ["read", "reset_peak", "reset_accumulated"]


def test_console_line_formats(caplog):
    from mythos_scale.train.metrics import format_count, format_duration
    from mythos_scale.train.metrics_log import MetricsLogger

    assert [format_duration(s) for s in (12, 185, 3720, 2 * 86400 + 3 * 3600 + 59, float("nan"))] == \
        ["12s", "3m05s", "1h02m", "2d03h", "?"]
    assert [format_count(n) for n in (950, 12_300, 4_560_000, 1.2e9)] == ["950", "12.3K", "4.56M", "1.2B"]
    row = {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.5, "loops/T": 4, "perf/tokens_per_s": 1e5,
           "perf/mfu": 0.4, "perf/step_s": 1.0, "train/tokens_seen": 4.56e6, "perf/eta_s": 3720,
           "train/skipped_steps": 0, "mem/allocated_gib": 60.0, "mem/reserved_gib": 70.2, "mem/reserved_pct": 50.1,
           "mem/alloc_retries": 3, "mem/ooms": 0}
    with caplog.at_level("INFO", logger="mythos_scale.train"):
        MetricsLogger([], console=True).row(10, 100, row, console=True)
    assert "| 4.56M tok | ETA 1h02m | mem 70.2 GiB (50%), 3 alloc retries" in caplog.text


@pytest.mark.slow
def test_profile_traces_only_the_configured_steps_and_ranks(tmp_path, tiny_dataset):
    run_train(tmp_path, [_data(tiny_dataset), "train.name=r", "train.max_steps=4", "train.checkpoint.every=100",
                         "train.profile={start_step: 2, end_step: 3, ranks: [1]}"], nproc=2)
    profile = tmp_path / "r" / "profile"
    assert sorted(str(p.relative_to(profile)) for p in profile.rglob("*") if p.is_file()) == \
        ["rank_00001/step_00000002.json", "rank_00001/step_00000003.json"]
    trace = json.loads((profile / "rank_00001" / "step_00000002.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names and "ProfilerStep" not in names  # one step's ops, the model's matmuls among them


def test_profile_settings_out_of_order_or_outside_the_world_are_refused(tmp_path):
    """Both refused at start-up (ConfigError: exit 2), before the run folder is made."""
    from mythos_scale.config import ConfigError, load_config
    from mythos_scale.parallel import ParallelLayout
    from mythos_scale.train.profiling import StepProfiler

    with pytest.raises(ConfigError, match=r"train.profile.end_step: \(2\) is before train.profile.start_step \(3\)"):
        load_config(overrides=["train.profile={start_step: 3, end_step: 2}"])
    settings = load_config(overrides=["train.profile={ranks: [0, 2]}"]).train.profile
    two_ranks = ParallelLayout(rank=0, world_size=2, local_rank=0, tp=1, ep=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.profile.ranks: \[2\] not in a world of 2"):
        StepProfiler(settings, tmp_path / "profile", two_ranks)
    assert not StepProfiler(None, tmp_path / "profile", two_ranks).active
    assert not any(tmp_path.iterdir())

"""What a run reports while it trains: W&B beside TensorBoard, the console line, perf/* and mem/*."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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
    run_train(tmp_path, [*args, "train.exit_after_steps=3"])
    run_train(tmp_path, args)  # resumes from step 3
    run = tmp_path / "r"
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
    assert {"train/loss", "perf/tokens_per_s", "mem/gib", "ckpt/save_s"} <= set(board)
    compared = 0
    for tag, points in board.items():
        for step, value in points.items():
            assert tag in logged[step], (tag, step)
            assert np.float32(logged[step][tag]) == np.float32(value), (tag, step, logged[step][tag], value)
            compared += 1
    assert compared == sum(len(v) for v in logged.values())  # and W&B holds nothing TensorBoard lacks


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

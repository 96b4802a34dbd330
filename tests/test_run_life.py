"""A run's life beyond one straight run: a warm start from another model's weights
(``train.init_from``) and a data mix that changes at a step (``data.stages``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mythos_scale.checkpoint import read_model_state
from mythos_scale.config import ConfigError, load_config
from mythos_scale.data.loader import build_train_loader
from mythos_scale.model import build_model
from mythos_scale.train.init_from import init_from_weights
from mythos_scale.train.loops import backprop_depth, sample_loops

from conftest import REPO, TINY_TRAIN, run_train


def _data(dataset: Path) -> str:
    return f"data.sources=[{{path: '{dataset}'}}]"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_record(run: Path) -> dict:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / tag / "COMPLETE.json").read_text())


def _first_step_lm_loss(cfg, model: torch.nn.Module) -> float:
    """The lm loss a fresh run's first step computes with ``model``'s weights (one process:
    train.global_batch_size / micro_batch_size micro-batches of the data's first samples)."""
    t = cfg.train
    loader = iter(build_train_loader(cfg.data, micro_batch_size=t.micro_batch_size, dp_rank=0, dp_world=1,
                                     vocab_size=cfg.model.vocab_size))
    n_loops = sample_loops(t.loops, t.seed, 0)
    total = torch.zeros(())
    with torch.no_grad():
        for _ in range(t.global_batch_size // t.micro_batch_size):
            inputs, labels = next(loader)
            logits = model(inputs, n_loops=n_loops, backprop_depth=backprop_depth(t.loops, n_loops)).logits.float()
            total += F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
    return (total / (t.global_batch_size // t.micro_batch_size)).item()


@pytest.mark.slow
def test_init_from_starts_at_step_0_with_the_source_weights_and_a_fresh_optimizer(tmp_path, tiny_dataset):
    common = [_data(tiny_dataset), "train.checkpoint.every=100"]
    run_train(tmp_path, [*common, "train.name=source", "train.max_steps=4"])
    source = tmp_path / "source"
    args = [*common, "train.name=warm", "train.max_steps=1", f"train.init_from={source}", "train.seed=7"]
    warm = run_train(tmp_path, args)
    log = warm.stdout + warm.stderr
    assert f"weights from train.init_from={source} (checkpoint at step 4)" in log and "start fresh, at step 0" in log

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [*TINY_TRAIN, *args])
    source_state = read_model_state(source / "checkpoints" / "step_00000004")
    model = build_model(cfg.model, seed=cfg.train.seed)
    fresh_loss = _first_step_lm_loss(cfg, model)
    init_from_weights(model, cfg, resuming=False, main=True)  # what the trainer does before parallelizing
    state = model.state_dict()
    assert state.keys() == source_state.keys()
    assert all(torch.equal(state[n], source_state[n]) for n in state)  # bitwise

    # the warm run's first step ran on those weights, on the data's first samples, with Adam at step 1
    [row] = _rows(tmp_path / "warm")
    assert row["step"] == 1 and row["train/tokens_seen"] == 4 * 32
    assert row["train/lm_loss"] == pytest.approx(_first_step_lm_loss(cfg, model), rel=1e-5)
    assert abs(row["train/lm_loss"] - fresh_loss) > 0.1  # a fresh init would have given another loss
    record = _checkpoint_record(tmp_path / "warm")
    assert record["optimizer"]["step"] == 1 and record["trainer"]["data"]["consumed_samples"] == 4
    assert _checkpoint_record(source)["optimizer"]["step"] == 4

    # restarted with init_from still set, the run resumes its own checkpoint
    again = run_train(tmp_path, [*args[:-2], "train.max_steps=2", f"train.init_from={source}", "train.seed=7"])
    assert "is not used: this run resumes from its own checkpoint" in again.stdout + again.stderr
    assert [r["step"] for r in _rows(tmp_path / "warm")] == [1, 2]

    # a path without a model: exit 2, naming it, nothing written
    bad = run_train(tmp_path, [*common, "train.name=bad", f"train.init_from={tmp_path / 'nowhere'}"], check=False)
    assert bad.returncode == 2 and f"train.init_from: {tmp_path / 'nowhere'} does not exist" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_init_from_a_model_of_other_shapes_is_refused(tmp_path):
    """Checked in-process on an export of another width: ConfigError names the tensors."""
    from safetensors.torch import save_file

    from mythos_scale.eval.export import export_checkpoint  # noqa: F401  (the export format is load_model's)

    other = load_config(overrides=["model.dim=64", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32"])
    export = tmp_path / "export"
    export.mkdir()
    save_file(build_model(other.model, seed=0).state_dict(), str(export / "model.safetensors"))
    (export / "config.yaml").write_text(json.dumps(other.model_dump(mode="json")))
    cfg = load_config(overrides=[f"train.init_from={export}", "model.max_seq_len=32", "data.seq_len=32"])
    with pytest.raises(ConfigError, match=r"(?s)does not fit this run's model\.\* settings:\n  .*\(64,\) in the source"):
        init_from_weights(build_model(cfg.model, seed=0), cfg, resuming=False, main=False)

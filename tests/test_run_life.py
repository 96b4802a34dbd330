"""A run's life beyond one straight run: a warm start from another model's weights
(``train.init_from``) and a data mix that changes at a step (``data.stages``)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mythos_scale.checkpoint import read_model_state
from mythos_scale.config import ConfigError, load_config
from mythos_scale.data.loader import build_train_loader
from mythos_scale.data.stages import build_staged_train_loader, stage_seed
from mythos_scale.model import build_model
from mythos_scale.train.init_from import init_from_weights
from mythos_scale.train.loops import sample_loops, step_backprop_depth

from conftest import REPO, TINY_TRAIN, run_train, subprocess_env


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
    loader = build_train_loader(cfg.data, micro_batch_size=t.micro_batch_size, dp_rank=0, dp_world=1,
                                vocab_size=cfg.model.vocab_size)
    eos_id = loader.sources[0].manifest.eos_id
    n_loops = sample_loops(t.loops, t.seed, 0)
    total = torch.zeros(())
    with torch.no_grad():
        for _ in range(t.global_batch_size // t.micro_batch_size):
            inputs, labels = next(loader)
            logits = model(inputs, n_loops=n_loops, backprop_depth=step_backprop_depth(t.loops, n_loops),
                           eos_id=eos_id).logits.float()
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


@pytest.fixture(scope="module")
def second_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """Another dataset (other stdlib modules) with the tiny dataset's tokenizer: a second mix."""
    root = tmp_path_factory.mktemp("second")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("csv.py", "difflib.py", "fractions.py", "heapq.py", "copy.py", "calendar.py"):
        (corpus / name).write_text((stdlib / name).read_text())
    subprocess.run([sys.executable, "-m", "mythos_scale.cli", "data", "prepare", "--input", str(corpus),
                    "--tokenizer", str(tiny_dataset.parent / "tokenizer.json"), "--seq-len", "32",
                    "--out", str(root / "shards"), "--val-fraction", "0.25", "--workers", "1"],
                   check=True, cwd=REPO, env=subprocess_env(), capture_output=True)
    return root / "shards"


def _by_step(run: Path, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in _rows(run)}  # a resumed run's repeats: the last one


@pytest.mark.slow
def test_data_stage_switch_resumes_exactly_on_either_side_of_it(tmp_path, tiny_dataset, second_dataset):
    stage = f"data.stages=[{{start_step: 3, sources: [{{path: '{second_dataset}'}}]}}]"
    common = [_data(tiny_dataset), "train.name=r", "train.max_steps=6", "train.checkpoint.every=2"]
    straight = run_train(tmp_path / "straight", [*common, stage])
    assert "data stage 1 from step 3" in straight.stdout + straight.stderr
    out_of_order = stage[:-1] + f", {{start_step: 2, sources: [{{path: '{tiny_dataset}'}}]}}]"
    bad = run_train(tmp_path / "bad", [*common, out_of_order], check=False)
    assert bad.returncode == 2 and "data.stages.1.start_step: (2) must be after" in bad.stderr
    assert not (tmp_path / "bad").exists()
    # Stopped at step 2 (before the switch; the stage not even configured yet: added on resume),
    # then at step 4 (after it), then run to the end: the same losses and weights, bitwise.
    stopped = tmp_path / "stopped"
    run_train(stopped, [*common, "train.exit_after_steps=2"])
    run_train(stopped, [*common, stage, "train.exit_after_steps=2"])
    # a config whose stage 1 would have begun at step 2 does not continue the checkpoint's stream
    moved = run_train(stopped, [*common, stage.replace("start_step: 3", "start_step: 2")], check=False)
    assert moved.returncode == 2 and "inside a data stage that started at step 3" in moved.stderr, moved.stderr[-2000:]
    run_train(stopped, [*common, stage])
    assert _by_step(stopped / "r") == _by_step(tmp_path / "straight" / "r")
    assert sorted(_by_step(stopped / "r")) == [1, 2, 3, 4, 5, 6]
    final = read_model_state(stopped / "r" / "checkpoints" / "step_00000006")
    reference = read_model_state(tmp_path / "straight" / "r" / "checkpoints" / "step_00000006")
    assert all(torch.equal(final[n], reference[n]) for n in reference)

    # what the stream holds: stage 0 as a run without stages, then the second dataset from its start
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [*TINY_TRAIN, *common, stage])
    kw = dict(micro_batch_size=2, dp_rank=0, dp_world=1, vocab_size=512)
    staged = build_staged_train_loader(cfg.data, global_batch_size=4, **kw)
    got = [next(staged)[0] for _ in range(12)]  # 6 steps x 2 micro-batches
    plain = build_train_loader(cfg.data.model_copy(update={"stages": []}), **kw)
    second = build_train_loader(cfg.data.model_copy(update={"sources": cfg.data.stages[0].sources, "stages": [],
                                                            "shuffle_seed": stage_seed(cfg.data.shuffle_seed, 1)}), **kw)
    expected = [next(plain)[0] for _ in range(6)] + [next(second)[0] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(got[6], next(plain)[0])


def test_data_stages_out_of_order_are_refused():
    with pytest.raises(ConfigError, match=r"data.stages.1.start_step: \(3\) must be after data.stages.0.start_step \(5\)"):
        load_config(overrides=["data.stages=[{start_step: 5, sources: [{path: a}]}, {start_step: 3, sources: [{path: b}]}]"])
    with pytest.raises(ConfigError, match=r"data.stages.0.start_step"):
        load_config(overrides=["data.stages=[{start_step: 0, sources: [{path: a}]}]"])

"""The loop-scaling study's models and the loop recipe's options: the FLOP-matched dense model
(``benchmarks/loop_scaling.py``), the loss over the backprop window (``train.loops.window_loss``),
the norm before the coda (``model.coda_norm``) and the per-iteration statistics."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from test_model import small_cfg, tokens

from mythos_scale.config import load_config
from mythos_scale.model import build_model
from mythos_scale.plan import plan_model

from conftest import REPO, TINY_TRAIN, subprocess_env

_spec = importlib.util.spec_from_file_location("loop_scaling", REPO / "benchmarks" / "loop_scaling.py")
loop_scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop_scaling)


def test_dense_model_matches_the_looped_flops_at_the_mean():
    looped = load_config(REPO / "configs" / "tiny_cpu.yaml")
    dense = load_config(REPO / "configs" / "tiny_cpu.yaml", loop_scaling.dense_overrides(looped))
    mean = looped.train.loops.mean
    assert dense.model.core_layers == looped.model.core_layers * mean == 6
    assert (dense.train.loops.sampler, dense.train.loops.mean, dense.model.max_loops) == ("fixed", 1, 1)
    seq = looped.data.seq_len
    at_mean = plan_model(looped.model, n_loops=mean, backprop_depth=mean, seq_len=seq)
    one = plan_model(dense.model, n_loops=1, backprop_depth=1, seq_len=seq)
    # equal compute per token (the dense model has no per-depth LoRA tables to run, hence ~)
    assert one["flops_per_token"] == pytest.approx(at_mean["flops_per_token"], rel=0.01)
    single = plan_model(looped.model, n_loops=1, backprop_depth=1, seq_len=seq)
    assert single["flops_per_token"] < 0.65 * one["flops_per_token"]  # the single loop is not matched
    assert 1.8 < one["params_total"] / at_mean["params_total"] < 2.2  # ~twice the weights
    with torch.device("meta"):
        model = build_model(dense.model)
    assert len(model.core) == 6
    assert plan_model(dense.model, 1, 1, seq)["params_total"] == sum(p.numel() for p in model.parameters())


def test_seed_overrides_change_init_and_data_order():
    base = load_config(REPO / "configs" / "tiny_cpu.yaml")
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", loop_scaling.seed_overrides(1, base))
    assert cfg.train.seed == base.train.seed + 1 and cfg.data.shuffle_seed == base.data.shuffle_seed + 1
    same = load_config(REPO / "configs" / "tiny_cpu.yaml", loop_scaling.seed_overrides(0, base))
    assert (same.train.seed, same.data.shuffle_seed) == (base.train.seed, base.data.shuffle_seed)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_window_states_are_the_predictions_of_shorter_runs(checkpointing):
    """window=True: the i-th final-norm state is what a forward of T - k + 1 + i loops predicts
    (truncated backprop and per-iteration checkpointing included), and the loss reaches the
    earlier iterations through them."""
    cfg = small_cfg(activation_checkpointing=checkpointing, coda_norm=True)
    model = build_model(cfg, seed=0)
    model.train()
    x = tokens(cfg)
    out = model(x, n_loops=4, backprop_depth=3, logits=False, window=True)
    assert len(out.window_hidden) == 3 and out.window_hidden[-1] is out.hidden
    with torch.no_grad():
        for i, hidden in enumerate(out.window_hidden):
            expected = model(x, n_loops=2 + i, logits=False).hidden
            torch.testing.assert_close(hidden, expected)
        assert not torch.allclose(out.window_hidden[0], out.window_hidden[1])
    assert model(x, n_loops=4, backprop_depth=3, logits=False).window_hidden == []
    # the earliest window state alone carries gradient into the core
    out.window_hidden[0].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.core.parameters())


def test_window_loss_refused_with_act_and_with_a_cache():
    with pytest.raises(ValueError, match="train.loops.window_loss"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["train.loops.window_loss=true", "model.act.enabled=true"])
    cfg = small_cfg()
    model = build_model(cfg, seed=0).eval()
    with pytest.raises(ValueError, match="window=True"):
        model(tokens(cfg), n_loops=2, cache=model.new_cache(2), window=True)


def test_coda_norm_makes_the_coda_read_one_scale():
    """With the norm before the coda, scaling the loop's output does not change the logits."""
    cfg = small_cfg(coda_norm=True)
    model = build_model(cfg, seed=0).eval()
    h = torch.randn(2, 5, cfg.dim)
    with torch.no_grad():
        torch.testing.assert_close(model._coda_logits(h, None, 0), model._coda_logits(3 * h, None, 0))
        plain = build_model(small_cfg(), seed=0).eval()
        assert not torch.allclose(plain._coda_logits(h, None, 0), plain._coda_logits(3 * h, None, 0))


def test_iteration_study_reads_the_model_stats():
    cfg = small_cfg()
    model = build_model(cfg, seed=0)
    batches = [(tokens(cfg, seed=s), None) for s in range(2)]
    stats = loop_scaling.iteration_study(model, batches, n_loops=4, reference_loops=12)
    assert all(len(stats[k]) == 4 for k in ("fixed_point_distance", "update_norm", "routing_entropy",
                                            "route_overlap", "core_change"))
    d = stats["fixed_point_distance"]
    assert d[0] > d[-1] > 0  # the state approaches its fixed point
    assert all(0 <= o <= 1 for o in stats["route_overlap"]) and stats["route_overlap"][0] == 1
    import math

    assert all(0 < e <= math.log(cfg.moe.n_routed_experts) + 1e-6 for e in stats["routing_entropy"])
    with torch.no_grad():
        direct = model(batches[0][0], n_loops=12).stats["update_norm"][:4]
    assert not torch.allclose(direct, torch.tensor(stats["update_norm"]))  # the mean of two batches, not one


WINDOW_TRAIN = r"""
import sys, torch
import torch.nn.functional as F
from mythos_scale.config import load_config
from mythos_scale.parallel import init_distributed
from mythos_scale.train.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]), init_distributed())
batches = iter(trainer.train_loader)
for _ in range(6):  # a few steps, so that the iterations' predictions differ
    metrics = trainer.train_step(batches)
assert metrics["train/window_loss"] > 0, metrics
inputs, labels = next(batches)
model = trainer.model
with torch.no_grad():
    out = model(inputs, n_loops=3, backprop_depth=2, logits=False, window=True, eos_id=trainer.eos_id)
    loss, parts = trainer._loss(out, labels)
    by_loops = [F.cross_entropy(model(inputs, n_loops=t, eos_id=trainer.eos_id).logits.flatten(0, 1).float(),
                                labels.flatten()) for t in (2, 3)]
torch.testing.assert_close(parts["window_loss"], sum(by_loops) / 2, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(parts["lm_loss"], by_loops[1], rtol=1e-5, atol=1e-5)
assert abs(by_loops[0] - by_loops[1]) > 1e-4, by_loops  # the window is not the last iteration alone
print("OK")
"""


@pytest.mark.slow
def test_window_loss_trains_in_the_real_engine(tiny_dataset, tmp_path):
    overrides = [*TINY_TRAIN, f"data.sources=[{{path: {tiny_dataset}}}]", f"train.out_dir={tmp_path}",
                 "train.loops.window_loss=true", "model.coda_norm=true", "model.activation_checkpointing=true",
                 "train.loops={sampler: fixed, mean: 3, min: 1, max: 3, backprop_depth: 2, window_loss: true}"]
    proc = subprocess.run([sys.executable, "-c", WINDOW_TRAIN, str(REPO / "configs" / "tiny_cpu.yaml"), *overrides],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_dense_baseline_config_is_a_1p3b_dense_transformer_on_the_rdt_data():
    dense = load_config(REPO / "configs" / "dense_1p3b.yaml")
    rdt = load_config(REPO / "configs" / "mythos_770m.yaml")
    plan = plan_model(dense.model, n_loops=1, backprop_depth=1, seq_len=dense.data.seq_len)
    assert 1.25e9 < plan["params_total"] < 1.35e9
    assert plan["params_active"] == plan["params_total"]  # no experts: every weight works on every token
    rdt_plan = plan_model(rdt.model, n_loops=rdt.train.loops.mean, backprop_depth=4, seq_len=rdt.data.seq_len)
    assert 1.6 < plan["params_total"] / rdt_plan["params_total"] < 1.8  # the seed's 1.3B vs 770M
    assert not dense.model.moe.enabled and dense.model.max_loops == 1
    assert (dense.train.loops.sampler, dense.train.loops.mean) == ("fixed", 1)
    assert dense.data == rdt.data and dense.model.vocab_size == rdt.model.vocab_size
    same_train = {"max_steps", "global_batch_size", "lr", "min_lr", "warmup_steps", "schedule", "precision"}
    assert dense.train.model_dump(include=same_train) == rdt.train.model_dump(include=same_train)

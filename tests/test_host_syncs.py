"""Host syncs per training step, counted by :class:`HostSyncCounter` (what would make the host
wait for a GPU): none in the model's forward and backward, EP split sizes read once per MoE call
(the activation-checkpoint recompute replays them), per-iteration statistics only on logged
steps, and a budget for the trainer's whole step that fails when a step adds one."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from test_model import lm_loss, small_cfg, tokens

from mythos_scale.model import build_model
from mythos_scale.model.recompute import host_values, replayed_in_recompute
from mythos_scale.train.host_syncs import HostSyncCounter

from conftest import REPO, TINY_TRAIN, free_port, subprocess_env

LOOPS, DEPTH = 8, 4  # T and k of the figure


def test_counter_sees_each_kind_of_sync():
    """The adversarial side of every count below: each way to sync is seen, plain device ops are not."""
    x = torch.randn(6)
    with HostSyncCounter() as syncs:
        y = (x * 2).exp().sum()
    assert syncs.total == 0
    with HostSyncCounter() as syncs:
        y.item(), bool(y > 0), x.tolist(), x.nonzero(), torch.tensor([1.0]), x.repeat_interleave(torch.tensor(2))
        x.repeat_interleave(torch.full((6,), 2), output_size=12)  # sized by the caller: no sync
    assert dict(syncs.by_kind) == {"item": 2, "tolist": 1, "shape_from_data": 2, "host_tensor": 2}
    assert x.tolist() and torch.Tensor.tolist is not None  # the wrapper is gone after the block


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_model_step_has_no_host_sync(kind):
    """Forward + backward of a training step (T=8, k=4, activation checkpointing, MoE through
    grouped_mm): 0 syncs.  The ``learned`` loop embedding used to build its row index on the
    host at every iteration: 20 (8 iterations + 8 for the statistics + 4 recomputes)."""
    cfg = small_cfg(loop_embedding=kind, activation_checkpointing=True, max_loops=LOOPS)
    model = build_model(cfg, seed=0).train()
    with HostSyncCounter() as syncs:
        lm_loss(model, tokens(cfg), n_loops=LOOPS, backprop_depth=DEPTH).backward()
    assert syncs.total == 0, dict(syncs.by_kind)


def test_recompute_replays_the_host_values_of_its_forward():
    """fp64 runs the per-expert loop, which reads its group sizes on the host once per MoE call:
    T x 2 core layers = 16 reads; the k=4 recomputed iterations replay theirs (before: 24).
    The gradients are bitwise those of the same model without checkpointing."""
    cfg = small_cfg(activation_checkpointing=True, max_loops=LOOPS)
    ids = tokens(cfg)
    grads = []
    for checkpointing in (True, False):
        model = build_model(cfg.model_copy(update=dict(activation_checkpointing=checkpointing)), seed=0)
        model = model.double().train()
        with HostSyncCounter() as syncs:
            lm_loss(model, ids, n_loops=LOOPS, backprop_depth=DEPTH).backward()
        assert syncs.total == LOOPS * cfg.core_layers, dict(syncs.by_kind)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[1])


def test_a_recompute_that_reads_elsewhere_is_an_error():
    reads = []

    def layer(key: str) -> list[int]:
        return host_values(key, lambda: reads.append(key) or [1, 2])

    run = replayed_in_recompute(layer)
    assert run("ep_splits") == [1, 2] and reads == ["ep_splits"]  # the forward reads
    assert run("ep_splits") == [1, 2] and reads == ["ep_splits"]  # the recompute replays
    with pytest.raises(RuntimeError, match="'expert_rows' #0"):
        run("expert_rows")
    assert host_values("anything", lambda: 7) == 7  # outside a checkpointed function: read


def _iterations(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Run a forward and record each loop iteration's (h_t, h_{t+1}, B_bar e, A_bar, loop index)."""
    seen = []
    iterate = model._iterate

    def recording(h, e_inj, a_bar, loop, *args, **kwargs):
        out = iterate(h, e_inj, a_bar, loop, *args, **kwargs)
        seen.append((h.detach().float(), out[0].detach().float(), e_inj.float(), a_bar.float(), loop))
        return out

    model._iterate = recording
    try:
        model(ids, n_loops=4, backprop_depth=2)
    finally:
        del model._iterate
    return seen


def test_statistics_only_when_asked_and_equal_to_their_definition():
    """``with_stats=True`` (a logged step): every per-iteration statistic equals its definition
    (the model docstring's), computed here from the iteration states, bit for bit; ``False``:
    the same logits and losses, none of those keys, and fewer ops dispatched (the fp32 passes are
    skipped, not just dropped)."""
    cfg = small_cfg(activation_checkpointing=False)
    model = build_model(cfg, seed=0).train()
    ids = tokens(cfg)
    torch.manual_seed(0)
    seen = _iterations(model, ids)
    outs, ops = [], []
    for with_stats in (True, False):
        torch.manual_seed(0)  # the same initial state noise
        with torch.no_grad(), _OpCounter() as counter:
            outs.append(model(ids, n_loops=4, backprop_depth=2, with_stats=with_stats))
        ops.append(counter.count)
    logged, unlogged = outs
    assert torch.equal(logged.logits, unlogged.logits) and torch.equal(logged.moe_aux_loss, unlogged.moe_aux_loss)
    with torch.no_grad():
        core = [nxt - (a_bar * h + e_inj + model.loop_embedding(t).float()) for h, nxt, e_inj, a_bar, t in seen]
        expected = {
            "h_norm": [nxt.norm(dim=-1).mean() for _, nxt, *_ in seen],
            "update_norm": [(nxt - h).norm(dim=-1).mean() for h, nxt, *_ in seen],
            "state_to_input": [(a_bar * h).pow(2).mean().sqrt() / e_inj.pow(2).mean().sqrt().clamp_min(1e-12)
                               for h, _, e_inj, a_bar, _ in seen],
            "core_change": [(c - prev).norm(dim=-1).mean() / c.norm(dim=-1).mean().clamp_min(1e-12)
                            for prev, c in zip(core, core[1:])]}
    for name, values in expected.items():
        assert torch.equal(logged.stats[name], torch.stack(values)), name
    assert "state_token_cos" in logged.stats
    assert not {*expected, "state_token_cos"} & set(unlogged.stats)
    assert ops[1] < ops[0] - 40, ops


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


# The trainer's whole step on 2 ranks, EP=2, T=8, k=4, activation checkpointing, one core layer,
# one micro-batch per rank (measured per rank, tests/host_sync_step.py):
#   8  EP split sizes: one per MoE call in the forward (the 4 recomputes replay; before: 12)
#   10 DeepSpeed's step: 3 torch optimizer step counters, 4 items and 3 host tensors in its
#      gradient norm and clipping (CPU engine; a GPU engine's own path may differ)
#   1  the batch built on the host by the loader (loader.py)
#   1  the grad norm read for the log, 1 the losses summed over ranks, 1 the expert-load ratios
UNLOGGED_STEP_SYNCS = 22
LOGGED_STEP_SYNCS = UNLOGGED_STEP_SYNCS + 1  # + all model statistics read in one sync
# Before this budget: 33 on every step (12 EP reads, 7 statistics reads, statistics on every step).


@pytest.mark.slow
def test_training_step_sync_budget(tmp_path):
    config = [str(REPO / "configs" / "tiny_cpu.yaml"), *TINY_TRAIN, f"train.out_dir={tmp_path}",
              "data.sources=[{path: embedded}]", f"model.max_loops={LOOPS}", "train.loops.sampler=fixed",
              *[f"train.loops.{key}={LOOPS}" for key in ("mean", "min", "max")],
              f"train.loops.backprop_depth={DEPTH}", "model.activation_checkpointing=true", "parallel.ep=2",
              "train.log_every=100"]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
           str(REPO / "tests" / "host_sync_step.py"), *config]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("syncs_rank*.json"))]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["unlogged"]["total"] <= UNLOGGED_STEP_SYNCS, rank
        assert rank["logged"]["total"] <= LOGGED_STEP_SYNCS, rank
        assert rank["unlogged"]["model_stats"] == [] and "model/core_change/iter_06" in rank["logged"]["model_stats"]


def test_an_ep_recompute_that_routes_differently_is_caught(tmp_path):
    """EP over a group of one: the recompute replays the forward's split sizes, and a recompute
    whose routing changed (here a balance bias moved between forward and backward, which would
    make the replayed sizes wrong) fails on the device-side check instead of mixing up rows."""
    import torch.distributed as dist

    from mythos_scale.parallel.ep import shard_experts

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        cfg = small_cfg(activation_checkpointing=True, max_loops=LOOPS)
        model = build_model(cfg, seed=0).train()
        shard_experts(model, 0, 1, dist.group.WORLD)
        ids = tokens(cfg)
        with HostSyncCounter() as syncs:
            lm_loss(model, ids, n_loops=LOOPS, backprop_depth=DEPTH).backward()
        assert syncs.by_kind["tolist"] == LOOPS * cfg.core_layers  # read in the forward only
        loss = lm_loss(model, ids, n_loops=LOOPS, backprop_depth=DEPTH)
        with torch.no_grad():
            for layer in model.core:
                layer.ffn.balance_bias[:, 0] += 100.0  # every token now picks expert 0 first
        with pytest.raises(RuntimeError, match="routed differently"):
            loss.backward()
    finally:
        dist.destroy_process_group()

"""The cluster planner's model: how memory, communication and step time respond to the layout,
and the search.  (Measured against the real trainer in test_plan_measured.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mythos_scale.config import load_config
from mythos_scale.plan.cluster import make_cluster
from mythos_scale.plan.comms import WIRE_FACTOR, communication
from mythos_scale.plan.estimate import make_plan
from mythos_scale.plan.layout import Layout, Runtime, layout_problems
from mythos_scale.plan.memory import GIB, estimate_memory
from mythos_scale.plan.search import search

REPO = Path(__file__).resolve().parents[1]
CFG = load_config(REPO / "configs" / "mythos_770m.yaml")
PARAMS_770M = 768_834_560  # the config's parameters (test_plan.py checks the planner's count against built models)
RT = Runtime.from_config(CFG, device="cuda")
BASE = Layout(dp=32, tp=1, ep=1, zero_stage=1, micro_batch=4, grad_accum=2, seq_len=4096, n_loops=8,
              backprop_depth=4, checkpointing=True)


def peak(layout: Layout, rt: Runtime = RT) -> float:
    return estimate_memory(CFG.model, layout, rt).peak


def test_runtime_follows_the_config_and_the_device():
    assert (RT.compute_bytes, RT.fused_kernels, RT.z_loss, RT.reduce_bucket_size) == (2, True, True, 500_000_000)
    tiny = load_config(REPO / "configs" / "tiny_cpu.yaml",
                       ["deepspeed.zero_optimization.reduce_bucket_size=1000", "model.kernels=reference"])
    cpu = Runtime.from_config(tiny, device="cpu")
    assert (cpu.compute_bytes, cpu.fused_kernels, cpu.z_loss, cpu.reduce_bucket_size) == (4, False, False, 1000)


def test_activation_memory_grows_with_k_not_t():
    """Truncated backprop with per-iteration checkpointing: flat in T, growing with k; without
    checkpointing each grad iteration keeps all it saved."""
    assert peak(replace(BASE, n_loops=16)) == peak(BASE) == peak(replace(BASE, n_loops=4))
    assert peak(replace(BASE, backprop_depth=8)) > peak(BASE) > peak(replace(BASE, backprop_depth=2))
    no_ckpt = replace(BASE, checkpointing=False)
    assert peak(no_ckpt) > 2 * peak(BASE)
    per_iteration = peak(replace(no_ckpt, backprop_depth=3)) - peak(replace(no_ckpt, backprop_depth=2))
    mem = estimate_memory(CFG.model, BASE, RT)
    assert per_iteration == pytest.approx(mem.activations["core_iteration"], rel=1e-9)
    assert peak(replace(BASE, micro_batch=8, grad_accum=1)) > 1.5 * peak(BASE)


def test_model_state_by_zero_stage_and_sharding():
    """bf16 weights on every rank; fp32 master and Adam moments sharded over DP (dense) and
    DP / EP (experts); TP and EP cut the local weights; ZeRO-2 holds less gradient memory."""
    m = estimate_memory(CFG.model, BASE, RT)
    params = PARAMS_770M
    assert m.static["weights"] == 2 * params
    assert m.static["master_fp32"] == pytest.approx(4 * params / 32)
    assert m.static["adam_fp32"] == pytest.approx(8 * params / 32)
    ep = estimate_memory(CFG.model, replace(BASE, ep=8), RT)
    routed = 566_231_040
    assert ep.static["weights"] == pytest.approx(2 * (params - routed + routed / 8))
    assert ep.static["master_fp32"] == pytest.approx(m.static["master_fp32"])   # DP/EP x EP = DP shards
    tp = estimate_memory(CFG.model, replace(BASE, tp=2, dp=16), RT)
    assert m.static["weights"] > tp.static["weights"] > m.static["weights"] / 2
    zero2 = estimate_memory(CFG.model, replace(BASE, zero_stage=2, micro_batch=8, grad_accum=1), RT)
    zero1 = estimate_memory(CFG.model, replace(BASE, micro_batch=8, grad_accum=1), RT)
    assert zero2.peaks["core_backward"] < zero1.peaks["core_backward"]
    assert zero2.peaks["gradient_reduction"] < zero1.peaks["gradient_reduction"]


def test_deepspeed_bucket_is_counted_whole():
    single = replace(RT, overlap_comm=False)
    small = replace(single, reduce_bucket_size=1_000_000)
    assert (estimate_memory(CFG.model, BASE, single).peaks["core_backward"]
            - estimate_memory(CFG.model, BASE, small).peaks["core_backward"]) == 2 * (500_000_000 - 1_000_000)
    assert RT.overlap_comm  # the default (train.overlap_comm) holds a second bucket
    assert (estimate_memory(CFG.model, BASE, RT).peaks["core_backward"]
            - estimate_memory(CFG.model, BASE, single).peaks["core_backward"]) == 2 * 500_000_000


def _by_name(layout: Layout, rt: Runtime = RT) -> dict[str, object]:
    return {f"{group}: {c.name}": c for group, calls in communication(CFG.model, layout, rt).items() for c in calls}


def test_data_parallel_traffic():
    """DeepSpeed all-reduces gradient buckets (ZeRO-1 once per step, ZeRO-2 once per micro-batch)
    and all-gathers the parameters; with EP the experts' go over DP / EP."""
    one = _by_name(BASE)
    grads, params = one["dp: gradients"], one["dp: parameters"]
    assert (grads.kind, grads.group_size, grads.calls) == ("all_reduce", 32, 1)
    assert grads.payload == params.payload == 2 * PARAMS_770M
    assert grads.wire_bytes == pytest.approx(2 * 31 / 32 * grads.payload)
    assert params.wire_bytes == pytest.approx(31 / 32 * params.payload)
    two = _by_name(replace(BASE, zero_stage=2))
    assert two["dp: gradients"].wire_bytes == BASE.grad_accum * grads.wire_bytes
    assert two["dp: parameters"].wire_bytes == params.wire_bytes
    owners = _by_name(BASE, replace(RT, multi_rank_bucket_allreduce=False))["dp: gradients"]
    assert owners.kind == "reduce" and owners.wire_bytes == pytest.approx(grads.wire_bytes / 2)
    ep = _by_name(replace(BASE, ep=8))
    assert ep["dp: expert gradients"].group_size == 4 and ep["dp: dense gradients"].group_size == 32
    assert ep["dp: expert gradients"].payload == pytest.approx(2 * 566_231_040 / 8)
    single = _by_name(replace(BASE, dp=1, grad_accum=64))
    assert "dp: parameters" not in single and single["dp: gradients"].wire_bytes == 0


def test_tensor_and_expert_parallel_traffic():
    """TP: 2 all-reduces of N x D per sub-layer pass, fwd and bwd, recompute repeating the forward
    ones; EP: one all-to-all each way of N x top_k x D rows per MoE call, fwd and bwd."""
    assert _by_name(BASE).keys() == {"dp: gradients", "dp: parameters", "dp: MoE expert counts"}
    tp_layout = replace(BASE, tp=2, dp=16, grad_accum=4)
    tp = _by_name(tp_layout)
    m = CFG.model
    n_dense, r = m.prelude_layers + m.coda_layers, m.core_layers
    fwd = tp["tp: sub-layer outputs (fwd)"]
    assert fwd.payload == 4 * 4096 * m.dim * 2
    assert fwd.calls == 2 * (n_dense + r * (8 + 4)) * 4                       # T + k recomputed, x grad_accum
    assert tp["tp: sub-layer input grads (bwd)"].calls == 2 * (n_dense + r * 4) * 4
    no_ckpt = _by_name(replace(tp_layout, checkpointing=False))
    assert no_ckpt["tp: sub-layer outputs (fwd)"].calls == 2 * (n_dense + r * 8) * 4
    ep = _by_name(replace(BASE, ep=4))
    rows = ep["ep: dispatch + combine (fwd)"]
    assert rows.kind == "all_to_all" and rows.group_size == 4
    assert rows.payload == 4 * 4096 * m.moe.top_k * m.dim * 2
    assert rows.calls == 2 * r * (8 + 4) * 2 and ep["ep: dispatch + combine (bwd)"].calls == 2 * r * 4 * 2
    assert rows.wire_bytes == pytest.approx(3 / 4 * rows.payload * rows.calls)
    assert WIRE_FACTOR["all_to_all"](1) == 0


def test_layout_problems_name_the_reason():
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.n_heads=6", "model.moe.n_routed_experts=6"])
    bad = Layout(dp=2, tp=4, ep=4, zero_stage=3, micro_batch=1, grad_accum=1, seq_len=512, n_loops=2,
                 backprop_depth=3, checkpointing=True)
    problems = "\n".join(layout_problems(cfg, bad, gpus_per_node=2))
    for reason in ("TP 4 spans nodes", "heads 6 not divisible by TP 4", "EP 4 > DP 2",
                   "experts 6 not divisible by EP 4", "ZeRO stage 3", "seq len 512 > model.max_seq_len 256",
                   "backprop depth 3 not in [0, loops 2]"):
        assert reason in problems
    assert layout_problems(cfg, replace(bad, tp=2, ep=2, zero_stage=1, seq_len=256, backprop_depth=2), 8) == []


def test_step_time_and_throughput():
    cluster = make_cluster("h100", nodes=4, gpus_per_node=8)
    plan = make_plan(CFG, cluster, BASE, RT, overlap=False, token_budget=1e9)
    t = plan.times
    assert t["step"] == t["step_no_overlap"] >= t["step_overlap"] > t["compute"] > 0
    assert t["step_no_overlap"] == pytest.approx(t["compute"] + t["dp_comm"] + t["optimizer"])
    assert plan.tokens_per_second == pytest.approx(256 * 4096 / t["step"])
    assert plan.mfu < plan.hfu < cluster.compute_efficiency
    assert plan.days_to_budget == pytest.approx(1e9 / plan.tokens_per_second / 86400)
    one_node = make_plan(CFG, make_cluster("h100", 1, 8), replace(BASE, dp=8, grad_accum=8), RT, False, 1e9)
    assert one_node.times["dp_comm"] < t["dp_comm"]   # NVLink only
    slow_network = make_plan(CFG, make_cluster("h100", 4, 8, internode_gbps=5.0), BASE, RT, False, 1e9)
    assert slow_network.times["dp_comm"] == pytest.approx(10 * t["dp_comm"], rel=0.05)
    assert plan.fits and not make_plan(CFG, make_cluster("h100", 4, 8, memory_gib=10), BASE, RT, False, 1e9).fits


def test_search_ranks_what_fits_and_says_why_the_rest_fail():
    cluster = make_cluster("a100-40gb", nodes=2, gpus_per_node=8)
    fits, rejected = search(CFG, cluster, RT, seq_len=4096, n_loops=8, backprop_depth=4, global_batch=64,
                            overlap=False, token_budget=1e9)
    speeds = [p.tokens_per_second for p in fits]
    assert fits and speeds == sorted(speeds, reverse=True)
    assert all(p.memory.peak <= p.usable_bytes for p in fits)
    reasons = "\n".join(r for item in rejected for r in item.reasons)
    for reason in ("out of memory", "EP 32 > DP 16", "TP 16 spans nodes", "not a multiple of micro-batch"):
        assert reason in reasons
    best = fits[0]
    again = make_plan(CFG, cluster, best.layout, RT, overlap=False, token_budget=1e9)
    assert again.step_seconds == best.step_seconds and again.memory.peak == best.memory.peak
    assert not any(p.layout.micro_batch == 16 and not p.layout.checkpointing for p in fits)
    assert min(p.memory.peak for p in fits) < 40 * GIB

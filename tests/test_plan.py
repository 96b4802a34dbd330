"""`mythos plan`'s counts: parameters equal the built model, FLOPs agree with torch's FLOP
counter, KV-cache figures follow the MLA formula and match a real cache; the TP/EP split of
both sums to them; the activation formula matches the tensors autograd really saves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_model import small_cfg, tokens
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mythos_scale.config import load_config
from mythos_scale.model import MythosModel, build_model
from mythos_scale.plan import main, plan_model
from mythos_scale.plan.layout import Runtime
from mythos_scale.plan.memory import block_saved, saved_bytes_per_token
from mythos_scale.plan.per_gpu import model_parts

REPO = Path(__file__).resolve().parents[1]

VARIANTS = [
    {},
    {"sandwich_norm": True, "tie_embeddings": False, "loop_embedding": "learned", "act": {"enabled": True},
     "coda_norm": True},
    {"n_heads": 4, "attention": {"type": "gqa", "n_kv_heads": 2}, "lora_targets": ["q", "kv", "o", "router"]},
    {"attention": {"q_lora_rank": 8}, "moe": {"enabled": False}, "lora_rank": 0},
    {"moe": {"depth_routing": False, "n_shared_experts": 0}, "loop_embedding": "none"},
]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts_equal_the_model(variant):
    cfg = small_cfg(**variant)
    with torch.device("meta"):
        model = MythosModel(cfg)
    plan = plan_model(cfg, n_loops=3, backprop_depth=2, seq_len=16)
    assert plan["params_total"] == sum(p.numel() for p in model.parameters())
    routed = sum(b.ffn.experts.w_gate.numel() * 3 for b in model.core) if cfg.moe.enabled else 0
    assert plan["params_routed_experts"] == routed
    m = cfg.moe
    inactive = routed * (m.n_routed_experts - m.top_k) // m.n_routed_experts if m.enabled else 0
    assert plan["params_active"] == plan["params_total"] - inactive


def grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """2 x (jagged length) x (the other two dims): torch's FLOP counter has no formula for the
    routed experts' grouped GEMM (2D x 3D forward; 2D x 2D and 2D x 3D in the backward)."""
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    if len(a_shape) == 3:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_match_torch_flop_counter(variant):
    """At seq_len 1 the causal attention average is exact, so the count must match to the FLOP:
    a forward with T loops, then the backward through the last k iterations.  (The math SDPA
    backend: the counter does not see inside CPU flash attention; v_head_dim equal to the qk head
    dim, else the zero padding of V for the flash kernels would add non-model FLOPs.)"""
    variant = {**variant, "attention": {**variant.get("attention", {}), "v_head_dim": 12}}
    cfg = small_cfg(activation_checkpointing=False, **variant)
    model = build_model(cfg, seed=0).train()
    loops, depth, batch = 3, 2, 4
    plan = plan_model(cfg, loops, depth, seq_len=1)
    ids = tokens(cfg, batch=batch, seq=1)
    count = dict(display=False, custom_mapping={torch.ops.aten._grouped_mm: grouped_mm_flops})
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(**count) as counter:
            out = model(ids, n_loops=loops, backprop_depth=depth)
        assert counter.get_total_flops() == plan["flops_per_token_forward"] * batch
        with FlopCounterMode(**count) as counter:
            (out.logits.sum() + out.ponder_cost + out.moe_aux_loss).backward()
    backward = plan["flops_per_token"] - plan["flops_per_token_forward"]
    assert counter.get_total_flops() == backward * batch


def test_flops_scale_with_loops_and_backprop_depth():
    cfg = small_cfg()
    base = plan_model(cfg, 4, 2, 64)
    more_loops = plan_model(cfg, 5, 2, 64)
    deeper = plan_model(cfg, 4, 3, 64)
    iteration = more_loops["flops_per_token"] - base["flops_per_token"]
    assert iteration == more_loops["flops_per_token_forward"] - base["flops_per_token_forward"] > 0
    assert deeper["flops_per_token"] - base["flops_per_token"] == 2 * iteration
    assert base["flops_per_token_with_recompute"] - base["flops_per_token"] == 2 * iteration


def test_mla_kv_cache_formula_and_real_cache():
    cfg = small_cfg()
    a, loops = cfg.attention, 3
    plan = plan_model(cfg, loops, loops, 16)
    layers = cfg.prelude_layers + cfg.coda_layers + cfg.core_layers * loops
    assert plan["kv_cache_elements_per_token"] == layers * (a.kv_lora_rank + a.qk_rope_head_dim)
    assert plan["kv_cache_bytes_per_token"] == 2 * plan["kv_cache_elements_per_token"]
    mha = layers * cfg.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    assert plan["kv_cache_bytes_per_token_mha"] == 2 * mha
    model = build_model(cfg, seed=0).eval()
    cache = model.new_cache(1)
    with torch.no_grad():
        model(tokens(cfg, batch=1, seq=4), loops, cache=cache)
    assert cache.elements_per_token() == plan["kv_cache_elements_per_token"]


def test_770m_config_is_770m():
    cfg = load_config(REPO / "configs" / "mythos_770m.yaml").model
    plan = plan_model(cfg, 8, 4, 4096)
    assert abs(plan["params_total"] - 770e6) / 770e6 < 0.02
    assert cfg.max_seq_len == 4096 and cfg.attention.type == "mla" and cfg.moe.enabled
    with torch.device("meta"):
        model = MythosModel(cfg)
    assert plan["params_total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp_ep_parts_sum_to_the_counts(variant):
    """Split + replicated + routed parameters and per-token FLOPs equal plan_model's totals, and
    TP divides exactly the split part."""
    cfg = small_cfg(**variant)
    plan = plan_model(cfg, n_loops=3, backprop_depth=2, seq_len=16)
    parts = model_parts(cfg, seq_len=16)
    assert parts.params.total == plan["params_total"]
    assert parts.params.routed == plan["params_routed_experts"]
    step = parts.step_flops_per_token(cfg, n_loops=3, backprop_depth=2, recompute=False)
    assert step.total == step.per_gpu(1) == plan["flops_per_token"]
    recompute = parts.step_flops_per_token(cfg, n_loops=3, backprop_depth=2, recompute=True)
    assert recompute.total - step.total == 2 * parts.core_iteration_flops.total
    assert step.per_gpu(2) == step.total - step.split / 2 and step.split > 0


def _saved_bytes_by_part(model: MythosModel, ids: torch.Tensor) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves during a forward with 1 loop, attributed
    to the prelude / core / coda block running when they were saved (else "other")."""
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen, by_part, current = set(), {}, ["other"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in static:
            seen.add(key)
            by_part[current[0]] = by_part.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    for part in ("prelude", "core", "coda"):
        for block in getattr(model, part):
            block.register_forward_pre_hook(lambda *_, part=part: current.__setitem__(0, part))
            block.register_forward_hook(lambda *_: current.__setitem__(0, "other"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, n_loops=1, backprop_depth=1)
    return by_part


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_formula_matches_saved_tensors(variant):
    """The planner's per-block activation bytes (fp32, the reference ops) are within 10% of what
    autograd saves for the real model: a prelude block, a coda block, one core iteration."""
    cfg = small_cfg(activation_checkpointing=False, kernels="reference", **variant)
    model = build_model(cfg, seed=0).train()
    batch, seq = 2, 16
    measured = _saved_bytes_by_part(model, tokens(cfg, batch=batch, seq=seq))
    rt = Runtime(device="cpu", compute_bytes=4, fused_kernels=False, z_loss=False, reduce_bucket_size=1,
                 multi_rank_bucket_allreduce=True, overlap_comm=False)
    per_token = {part: value / (batch * seq) for part, value in measured.items()}
    dense = saved_bytes_per_token(cfg, rt)["dense_block"]
    assert per_token["prelude"] / cfg.prelude_layers == pytest.approx(dense, rel=0.10)
    assert per_token["coda"] / cfg.coda_layers == pytest.approx(dense, rel=0.10)
    core = cfg.core_layers * block_saved(cfg, rt, core=True)
    assert per_token["core"] == pytest.approx(core, rel=0.10)


def test_cli_json_and_table(capsys):
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    assert main(["--config", config, "--loops", "6", "--backprop-depth", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token",
                "kv_cache_bytes_per_token_mha"):
        assert key in out["model"]
    assert (out["model"]["n_loops"], out["model"]["backprop_depth"]) == (6, 2)
    plan = out["plan"]
    assert plan["layout"]["dp"] == 8 and plan["layout"]["micro_batch"] == 2 and plan["fits"]
    assert plan["memory"]["peak"] > plan["memory"]["static_total"]
    assert plan["time_s"]["step"] > plan["time_s"]["compute"] > 0 and 0 < plan["mfu"] < 1
    assert main(["--config", config, "--nodes", "2", "--gpu", "a100", "model.dim=64", "--global-batch", "16",
                 "--micro-batch", "1"]) == 0
    table = capsys.readouterr().out
    for line in ("params total", "KV cache per token", "memory per GPU", "dp: gradients", "throughput",
                 "token budget"):
        assert line in table
    assert "2 x 8 A100 SXM 80GB" in table


def test_cli_search_json(capsys):
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    assert main(["--config", config, "--nodes", "1", "--search", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    speeds = [p["tokens_per_s"] for p in out["fits"]]
    assert speeds and speeds == sorted(speeds, reverse=True)
    assert all(p["fits"] for p in out["fits"]) and out["rejected"]
    assert main(["--config", config, "--search", "--top", "3"]) == 0
    assert "fastest first" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dimm: 3\n")
    proc = subprocess.run([sys.executable, "-m", "mythos_scale.cli", "plan", "--config", str(bad)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "model.dimm" in proc.stderr
    assert main(["--loops", "2", "--backprop-depth", "3"]) == 2
    config = str(REPO / "configs" / "mythos_770m.yaml")
    assert main(["--config", config, "--nodes", "16", "--micro-batch", "4"]) == 2   # 4 x DP 128 > 256
    assert "global batch 256 is not a multiple of micro-batch 4 x DP 128" in capsys.readouterr().err
    assert main(["--config", config, "--tp", "3"]) == 2
    assert main(["--config", config, "--dp", "4", "--tp", "4"]) == 2
    assert main(["--config", config, "--micro-batch", "1", "--tp", "8", "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert "--tp 3 does not divide" in err and "EP 3 > DP 1" in err and "--dp 4 x --tp 4 must equal" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--gpu", "tpu"])
    assert exit_info.value.code == 2

"""`mythos plan`: parameter counts equal the built model, FLOPs agree with torch's FLOP counter,
KV-cache figures follow the MLA formula and match a real cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mythos_scale.config import load_config
from mythos_scale.model import MythosModel, build_model
from mythos_scale.plan import main, plan_model
from test_model import small_cfg, tokens

REPO = Path(__file__).resolve().parents[1]

VARIANTS = [
    {},
    {"sandwich_norm": True, "tie_embeddings": False, "loop_embedding": "learned", "act": {"enabled": True}},
    {"n_heads": 4, "attention": {"type": "gqa", "n_kv_heads": 2}, "lora_targets": ["q", "kv", "o", "router"]},
    {"attention": {"q_lora_rank": 8}, "moe": {"enabled": False}, "lora_rank": 0},
    {"moe": {"depth_routing": False, "n_shared_experts": 0}},
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts_equal_the_model(variant):
    cfg = small_cfg(**variant)
    with torch.device("meta"):
        model = MythosModel(cfg)
    plan = plan_model(cfg, loops=3, backprop_depth=2, seq_len=16)
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


def test_cli_json_and_table(capsys):
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    assert main(["--config", config, "--loops", "6", "--backprop-depth", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token",
                "kv_cache_bytes_per_token_mha"):
        assert key in plan
    assert (plan["loops"], plan["backprop_depth"]) == (6, 2)
    assert main(["--config", config, "model.dim=64"]) == 0
    table = capsys.readouterr().out
    assert "params total" in table and "KV cache per token" in table


def test_cli_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dimm: 3\n")
    proc = subprocess.run([sys.executable, "-m", "mythos_scale.cli", "plan", "--config", str(bad)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "model.dimm" in proc.stderr
    assert main(["--loops", "2", "--backprop-depth", "3"]) == 2

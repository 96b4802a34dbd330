"""Parameters, training FLOPs per token and KV-cache size of a config.

Counts are analytic (from the config alone, so a 770M or larger plan costs nothing) and are
tested to equal the built model's ``sum(p.numel())``.

FLOPs per token of one training step with T loops and backprop depth k (model FLOPs, the MFU
numerator; embedding lookups and elementwise ops are not counted):

    fwd(part)  = 2 * (matmul weights the token passes through in `part`)
                 + attention 2 * H * (d_qk + d_v) * (S + 1) / 2 per attention layer
                   (causal: a token attends to (S + 1) / 2 positions on average)
    forward    = fwd(prelude) + fwd(injection B) + T * fwd(core iteration) + fwd(coda) + fwd(head)
    backward   = 2 * [fwd(prelude) + fwd(injection B) + k * fwd(core iteration) + fwd(coda) + fwd(head)]
    flops_per_token = forward + backward

The prelude still runs its backward: B_bar e enters every iteration, the last k included.  A
core iteration counts the top_k routed experts, the shared experts, the router and one
iteration's LoRA adapters; the ACT halting unit runs in the last k iterations only (at least one).
``flops_per_token_with_recompute`` adds the forward recomputation of the k checkpointed iterations (hardware FLOPs).

KV cache per token (bf16, 2 bytes): MLA stores kv_lora_rank + qk_rope_head_dim per layer per
loop iteration, ``(prelude + coda + core_layers * T)`` caches; the MHA comparison stores full
keys H * (qk_nope + qk_rope) and values H * v_head_dim for the same heads.  GQA stores
2 * n_kv_heads * head_dim.
"""

from __future__ import annotations

from typing import Any

from mythos_scale.config import ModelConfig

KV_CACHE_DTYPE_BYTES = 2  # bf16


def _attention_projections(cfg: ModelConfig) -> list[tuple[int, int, str | None]]:
    """(in, out, lora target) of every attention matrix."""
    a, d, h = cfg.attention, cfg.dim, cfg.n_heads
    if a.type == "gqa":
        hd = d // h
        return [(d, h * hd, "q"), (d, 2 * a.n_kv_heads * hd, "kv"), (h * hd, d, "o")]
    q_out = h * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    q = [(d, q_out, "q")] if a.q_lora_rank == 0 else [(d, a.q_lora_rank, None), (a.q_lora_rank, q_out, "q")]
    return q + [(d, a.kv_lora_rank + a.qk_rope_head_dim, "kv"),
                (a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim), None),
                (h * a.v_head_dim, d, "o")]


def _attention_vectors(cfg: ModelConfig) -> int:
    a = cfg.attention
    return 0 if a.type == "gqa" else a.kv_lora_rank + a.q_lora_rank


def _attention_score_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward QK^T and AV FLOPs per token per attention layer, causal."""
    a, h = cfg.attention, cfg.n_heads
    if a.type == "gqa":
        qk = v = cfg.dim // h
    else:
        qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    return 2.0 * h * (qk + v) * (seq_len + 1) / 2


def _block(cfg: ModelConfig, core: bool) -> dict[str, int]:
    """Parameters of one block (``params``, ``routed`` among them) and matmul weights per token
    of one pass (``active_matmul``, core: one loop iteration)."""
    d, m = cfg.dim, cfg.moe
    norms = (4 if cfg.sandwich_norm else 2) * d
    projections = _attention_projections(cfg)
    matrices = sum(i * o for i, o, _ in projections)
    params = norms + matrices + _attention_vectors(cfg)
    active = matrices
    routed = 0
    if core and cfg.lora_rank > 0:
        lora = sum(cfg.lora_rank * (i + o) for i, o, t in projections if t in cfg.lora_targets)
        params += cfg.max_loops * lora
        active += lora
    if core and m.enabled:
        expert = 3 * d * m.expert_hidden
        routed = m.n_routed_experts * expert
        router = d * m.n_routed_experts
        router_lora = cfg.lora_rank * (d + m.n_routed_experts) if "router" in cfg.lora_targets else 0
        shared = m.n_shared_experts * expert
        params += router + cfg.max_loops * router_lora + routed + shared
        params += cfg.max_loops * m.n_routed_experts if m.depth_routing else 0
        active += router + router_lora + m.top_k * expert + shared
    else:
        params += 3 * d * cfg.dense_ffn_hidden
        active += 3 * d * cfg.dense_ffn_hidden
    return {"params": params, "routed": routed, "active_matmul": active}


def plan_model(cfg: ModelConfig, n_loops: int, backprop_depth: int, seq_len: int) -> dict[str, Any]:
    """Parameter counts, FLOPs per token (fwd+bwd, see module doc) and KV-cache size per token."""
    if n_loops < 1:
        raise ValueError(f"n_loops must be >= 1, got {n_loops}")
    if not 0 <= backprop_depth <= n_loops:
        raise ValueError(f"backprop_depth must be in [0, n_loops={n_loops}], got {backprop_depth}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    d, v = cfg.dim, cfg.vocab_size
    dense, core = _block(cfg, core=False), _block(cfg, core=True)
    n_dense = cfg.prelude_layers + cfg.coda_layers
    loop_embedding = {"sinusoidal": d, "learned": cfg.max_loops * d, "none": 0}[cfg.loop_embedding]
    halting = d + 1 if cfg.act.enabled else 0
    params = {
        "embedding": v * d,
        "prelude": cfg.prelude_layers * dense["params"],
        # injection, prelude norm, loop emb, ACT, coda norm
        "recurrence": 2 * d + d * d + d + loop_embedding + halting + (d if cfg.coda_norm else 0),
        "core": cfg.core_layers * core["params"],
        "coda": cfg.coda_layers * dense["params"],
        "head": d + (0 if cfg.tie_embeddings else v * d),
    }
    total = sum(params.values())
    routed = cfg.core_layers * core["routed"]
    m = cfg.moe
    active = total - routed + (routed * m.top_k // m.n_routed_experts if m.enabled else 0)

    attn = _attention_score_flops(cfg, seq_len)
    fwd_dense_layer = 2 * dense["active_matmul"] + attn
    fwd_core_iteration = cfg.core_layers * (2 * core["active_matmul"] + attn)
    fwd_halting = 2 * d if cfg.act.enabled else 0  # ACT runs in the grad-carrying iterations (at least one)
    fwd_outside_core = n_dense * fwd_dense_layer + 2 * d * d + 2 * d * v  # + injection B, LM head
    forward = fwd_outside_core + n_loops * fwd_core_iteration + max(backprop_depth, 1) * fwd_halting
    backward = 2 * (fwd_outside_core + backprop_depth * (fwd_core_iteration + fwd_halting))
    recompute = backprop_depth * fwd_core_iteration if cfg.activation_checkpointing else 0

    a = cfg.attention
    cached_layers = n_dense + cfg.core_layers * n_loops
    if a.type == "mla":
        kv_per_layer = a.kv_lora_rank + a.qk_rope_head_dim
        mha_per_layer = cfg.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    else:
        kv_per_layer = 2 * a.n_kv_heads * (d // cfg.n_heads)
        mha_per_layer = 2 * cfg.n_heads * (d // cfg.n_heads)
    kv_elements, mha_elements = cached_layers * kv_per_layer, cached_layers * mha_per_layer
    return {
        "n_loops": n_loops,
        "backprop_depth": backprop_depth,
        "seq_len": seq_len,
        "params_total": total,
        "params_active": active,
        "params_breakdown": params,
        "params_routed_experts": routed,
        "flops_per_token": forward + backward,
        "flops_per_token_forward": forward,
        "flops_per_token_with_recompute": forward + backward + recompute,
        "kv_cache_layers": cached_layers,
        "kv_cache_elements_per_token": kv_elements,
        "kv_cache_bytes_per_token": kv_elements * KV_CACHE_DTYPE_BYTES,
        "kv_cache_elements_per_token_mha": mha_elements,
        "kv_cache_bytes_per_token_mha": mha_elements * KV_CACHE_DTYPE_BYTES,
    }

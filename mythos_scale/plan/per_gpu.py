"""What one GPU holds and computes under TP and EP.

The parameters and per-token FLOPs of :mod:`counts`, split three ways:

- ``split``: divided over the TP group.  MLA's query up-projection and ``wkv_b``
  (column-parallel by heads), ``wo`` (row-parallel), the attention scores (by heads), the
  dense FFN and the shared experts (column / row parallel).  GQA: all three projections.
- ``replicated``: every TP rank holds and computes all of it.  ``wq_a`` / ``wkv_a`` (the
  down-projections, rope key included), norms, depth-wise LoRA adapters, the router, the
  injection, loop embedding, ACT unit, embedding and (tied) LM head.
- ``routed``: the routed experts.  Their weights are partitioned over the EP group and not
  over TP, so every TP rank of a replica runs the experts on the replica's tokens (the
  FLOPs are duplicated over TP; with balanced routing EP leaves per-GPU FLOPs unchanged).

``split + replicated + routed`` equals the totals of :func:`counts.plan_model` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from mythos_scale.config import ModelConfig
from mythos_scale.plan.counts import _attention_projections, _attention_score_flops, _attention_vectors
from mythos_scale.plan.layout import Layout


@dataclass(frozen=True)
class Parts:
    split: float = 0.0
    replicated: float = 0.0
    routed: float = 0.0

    def __add__(self, other: Parts) -> Parts:
        return Parts(self.split + other.split, self.replicated + other.replicated, self.routed + other.routed)

    def __mul__(self, k: float) -> Parts:
        return Parts(self.split * k, self.replicated * k, self.routed * k)

    __rmul__ = __mul__

    @property
    def total(self) -> float:
        return self.split + self.replicated + self.routed

    def per_gpu(self, tp: int) -> float:
        return self.split / tp + self.replicated + self.routed


def _attention(cfg: ModelConfig, core: bool) -> tuple[Parts, Parts]:
    """(parameters, forward matmul weights per token) of one attention layer.  MLA's
    down-projections (no LoRA target, or the ``kv`` target ``wkv_a``) are replicated; the rest
    is split by heads."""
    mla = cfg.attention.type == "mla"
    split = replicated = lora = 0
    for i, o, target in _attention_projections(cfg):
        down = mla and (target == "kv" or (target is None and o == cfg.attention.q_lora_rank))
        if down:
            replicated += i * o
        else:
            split += i * o
        if core and cfg.lora_rank > 0 and target in cfg.lora_targets:
            lora += cfg.lora_rank * (i + o)
    params = Parts(split=split, replicated=replicated + _attention_vectors(cfg) + cfg.max_loops * lora)
    return params, Parts(split=split, replicated=replicated + lora)


def _ffn(cfg: ModelConfig, core: bool) -> tuple[Parts, Parts]:
    d, m = cfg.dim, cfg.moe
    if not (core and m.enabled):
        dense = 3 * d * cfg.dense_ffn_hidden
        return Parts(split=dense), Parts(split=dense)
    expert = 3 * d * m.expert_hidden
    router = d * m.n_routed_experts
    router_lora = cfg.lora_rank * (d + m.n_routed_experts) if "router" in cfg.lora_targets else 0
    depth_bias = cfg.max_loops * m.n_routed_experts if m.depth_routing else 0
    params = Parts(split=m.n_shared_experts * expert,
                   replicated=router + cfg.max_loops * router_lora + depth_bias,
                   routed=m.n_routed_experts * expert)
    active = Parts(split=m.n_shared_experts * expert, replicated=router + router_lora, routed=m.top_k * expert)
    return params, active


def block_parts(cfg: ModelConfig, core: bool, seq_len: int) -> tuple[Parts, Parts]:
    """(parameters, forward FLOPs per token) of one block; core: one loop iteration."""
    attn_params, attn_active = _attention(cfg, core)
    ffn_params, ffn_active = _ffn(cfg, core)
    norms = (4 if cfg.sandwich_norm else 2) * cfg.dim
    params = attn_params + ffn_params + Parts(replicated=norms)
    flops = 2 * (attn_active + ffn_active) + Parts(split=_attention_score_flops(cfg, seq_len))
    return params, flops


@dataclass(frozen=True)
class ModelParts:
    params: Parts
    dense_layer_flops: Parts      # forward FLOPs per token of one prelude / coda block
    core_iteration_flops: Parts   # forward FLOPs per token of one loop iteration (all core blocks)
    outside_flops: Parts          # injection B and LM head, once per forward
    halting_flops: Parts          # the ACT unit, in each grad-carrying iteration (at least one)

    def _once(self, cfg: ModelConfig) -> Parts:
        return self.outside_flops + (cfg.prelude_layers + cfg.coda_layers) * self.dense_layer_flops

    def backward_flops_per_token(self, cfg: ModelConfig, backprop_depth: int) -> Parts:
        """2x the forward of what gradients flow through: all but the T - k no-grad iterations."""
        return 2 * (self._once(cfg) + backprop_depth * (self.core_iteration_flops + self.halting_flops))

    def step_flops_per_token(self, cfg: ModelConfig, n_loops: int, backprop_depth: int, recompute: bool) -> Parts:
        """Hardware FLOPs per token of one training step: forward, backward and, with
        checkpointing, the recomputed iterations."""
        forward = self._once(cfg) + n_loops * self.core_iteration_flops + max(backprop_depth, 1) * self.halting_flops
        recomputed = backprop_depth * self.core_iteration_flops if recompute else Parts()
        return forward + self.backward_flops_per_token(cfg, backprop_depth) + recomputed


def model_parts(cfg: ModelConfig, seq_len: int) -> ModelParts:
    d, v = cfg.dim, cfg.vocab_size
    dense_params, dense_flops = block_parts(cfg, core=False, seq_len=seq_len)
    core_params, core_flops = block_parts(cfg, core=True, seq_len=seq_len)
    loop_embedding = {"sinusoidal": d, "learned": cfg.max_loops * d, "none": 0}[cfg.loop_embedding]
    halting = d + 1 if cfg.act.enabled else 0
    # embedding, injection (A_log, dt_bias, B), its norm, loop embedding, ACT, final norm, untied head
    coda_norm = d if cfg.coda_norm else 0
    model_level = (v * d + 2 * d + d * d + d + loop_embedding + halting + coda_norm + d
                   + (0 if cfg.tie_embeddings else v * d))
    params = ((cfg.prelude_layers + cfg.coda_layers) * dense_params + cfg.core_layers * core_params
              + Parts(replicated=model_level))
    return ModelParts(params=params, dense_layer_flops=dense_flops, core_iteration_flops=cfg.core_layers * core_flops,
                      outside_flops=Parts(replicated=2 * d * d + 2 * d * v),
                      halting_flops=Parts(replicated=2 * d) if cfg.act.enabled else Parts())


@dataclass(frozen=True)
class LocalParams:
    """The parameters one GPU holds, and its ZeRO shard of them (dense over DP, experts over DP / EP)."""

    dense: float
    expert: float
    shard: float

    @property
    def total(self) -> float:
        return self.dense + self.expert


def local_params(cfg: ModelConfig, layout: Layout) -> LocalParams:
    params = model_parts(cfg, layout.seq_len).params
    dense = params.split / layout.tp + params.replicated
    expert = params.routed / layout.ep
    return LocalParams(dense=dense, expert=expert, shard=dense / layout.dp + expert / layout.edp)

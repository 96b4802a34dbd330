"""The Recurrent-Depth Transformer: Prelude -> looped Core (LTI injection, MLA + DeepSeekMoE,
depth-wise LoRA, optional ACT) -> Coda -> RMSNorm -> LM head.

Call it as ``model(input_ids, n_loops=T, backprop_depth=k)``.  ``n_loops`` defaults to
``model.default_loops = max(1, max_loops // 2)``; ``backprop_depth=None`` backpropagates through
all T iterations, otherwise the first ``T - k`` run under ``torch.no_grad()``.  With
``cfg.activation_checkpointing`` each grad-carrying iteration is checkpointed
(``use_reentrant=False``), so activation memory grows with k, not T.

Incremental decoding: ``cache = model.new_cache(batch_size)``, then
``model(prompt, T, cache=cache)`` followed by ``model(next_tokens, T, cache=cache, start_pos=n)``
with the same T; the logits equal those of one full forward over the whole sequence.

Initialization: every matrix ~ N(0, init_std); the projections that write into the residual
stream (attention output, FFN / expert down projections) use ``init_std / sqrt(2 * L_eff)``
with ``L_eff = prelude_layers + coda_layers + core_layers * default_loops`` blocks (two residual
writes per block); LoRA ``B_t`` = 0; norms = 1; injection ``B`` = I.

Weight decay: :meth:`MythosModel.no_weight_decay_names` lists the parameters to exclude (all
vectors, the injection's A_log/dt_bias/B, the per-depth router bias, the loop embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import ops, select_kernels
from mythos_scale.model.attention import build_attention
from mythos_scale.model.cache import KVCache
from mythos_scale.model.layers import DenseFFN, LoopLinear, RMSNorm, RotaryTable
from mythos_scale.model.moe import MoE, RoutedExperts
from mythos_scale.model.recurrence import ACTAccumulator, HaltingUnit, LoopEmbedding, LTIInjection


@dataclass
class ModelOutput:
    """``moe_aux_loss`` and ``ponder_cost`` are already scaled by their config coefficients
    (zero tensors when unused); ``stats`` holds detached tensors for logging."""

    logits: torch.Tensor
    moe_aux_loss: torch.Tensor
    ponder_cost: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Block(nn.Module):
    """Pre-norm (optionally sandwich-norm) attention + FFN.  Core blocks use MoE and LoRA."""

    def __init__(self, cfg: ModelConfig, core: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg, cfg.max_loops if core else 0)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if core and cfg.moe.enabled else DenseFFN(cfg.dim, cfg.dense_ffn_hidden)
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.attn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.ffn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: RotaryTable, loop: int | None = None, cache: KVCache | None = None,
                cache_key: tuple = (), start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns ``(x, moe_aux_loss, expert_counts)``; the last two are None for a dense FFN."""
        layer_cache = cache.layer(cache_key) if cache is not None else None
        absorb = cache.absorb if cache is not None else True
        a = self.attn(self.attn_norm(x), rope, loop, layer_cache, start_pos, absorb)
        x = x + (self.attn_post_norm(a) if self.sandwich else a)
        aux = counts = None
        if isinstance(self.ffn, MoE):
            f, aux, counts = self.ffn(self.ffn_norm(x), loop)
        else:
            f = self.ffn(self.ffn_norm(x))
        x = x + (self.ffn_post_norm(f) if self.sandwich else f)
        return x, aux, counts


class MythosModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.default_loops = max(1, cfg.max_loops // 2)
        rope_dim = cfg.attention.qk_rope_head_dim if cfg.attention.type == "mla" else cfg.dim // cfg.n_heads
        self.rope = RotaryTable(rope_dim, cfg.max_seq_len, cfg.attention.rope_theta)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.prelude = nn.ModuleList(Block(cfg, core=False) for _ in range(cfg.prelude_layers))
        self.injection = LTIInjection(cfg)
        self.inject_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.loop_embedding = LoopEmbedding(cfg)
        self.core = nn.ModuleList(Block(cfg, core=True) for _ in range(cfg.core_layers))
        self.halting = HaltingUnit(cfg) if cfg.act.enabled else None
        self.coda = nn.ModuleList(Block(cfg, core=False) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    # ------------------------------------------------------------------ setup

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        std = cfg.init_std
        depth = cfg.prelude_layers + cfg.coda_layers + cfg.core_layers * self.default_loops
        out_std = std / math.sqrt(2 * depth)

        def normal(p: torch.Tensor, s: float) -> None:
            p.normal_(0.0, s, generator=generator)

        for module in self.modules():
            if isinstance(module, (LoopLinear, nn.Linear)):
                normal(module.weight, out_std if getattr(module, "is_output_projection", False) else std)
                if isinstance(module, LoopLinear) and module.lora_a is not None:
                    normal(module.lora_a, std)
                    module.lora_b.zero_()
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, RoutedExperts):
                normal(module.w_gate, std)
                normal(module.w_up, std)
                normal(module.w_down, out_std)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, RotaryTable):
                module.reset_parameters()
            elif isinstance(module, MoE):
                module.balance_bias.zero_()
                module.expert_counts.zero_()
                if module.depth_bias is not None:
                    module.depth_bias.zero_()
            elif isinstance(module, LTIInjection):
                inj = cfg.injection
                module.a_log.fill_(inj.a_log_init)
                module.dt_bias.fill_(inj.dt_init + math.log(-math.expm1(-inj.dt_init)))
                module.b.copy_(torch.eye(cfg.dim))
            elif isinstance(module, LoopEmbedding):
                if module.kind == "sinusoidal":
                    module.gain.fill_(std / 10)
                else:
                    normal(module.table, std / 10)
        if self.halting is not None:
            self.halting.proj.bias.fill_(cfg.act.halt_bias_init)

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names to put in the optimizer's no-weight-decay group."""
        return {name for name, p in self.named_parameters()
                if p.ndim < 2 or name.startswith(("embed.", "injection.", "loop_embedding."))
                or name.endswith("depth_bias")}

    def spectral_radius(self) -> torch.Tensor:
        """rho(A_bar): A_bar is diagonal and positive, so its largest entry (fp32, detached)."""
        return self.injection.a_bar().detach().max()

    def new_cache(self, batch_size: int, max_len: int | None = None, absorb: bool = True) -> KVCache:
        return KVCache(batch_size, max_len or self.cfg.max_seq_len, absorb)

    # ------------------------------------------------------------------ forward

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    def _iterate(self, h: torch.Tensor, e_inj: torch.Tensor, a_bar: torch.Tensor, loop: int,
                 cache: KVCache | None, start_pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One loop iteration: inject + normalize, then the R shared core blocks.
        Returns ``(h_next, summed moe aux loss, expert counts (R, E) or empty)``."""
        x = ops().inject_rmsnorm(h, e_inj, a_bar, self.loop_embedding(loop).to(h.dtype),
                                 self.inject_norm.weight, self.cfg.norm_eps)
        aux = h.new_zeros((), dtype=torch.float32)
        counts = []
        for i, block in enumerate(self.core):
            x, block_aux, block_counts = block(x, self.rope, loop, cache, ("core", loop, i), start_pos)
            if block_aux is not None:
                aux = aux + block_aux
                counts.append(block_counts)
        return x, aux, torch.stack(counts) if counts else h.new_zeros(0)

    def forward(self, input_ids: torch.Tensor, n_loops: int | None = None, backprop_depth: int | None = None,
                cache: KVCache | None = None, start_pos: int = 0) -> ModelOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        loops = self.default_loops if n_loops is None else n_loops
        if loops < 1:
            raise ValueError(f"n_loops must be >= 1, got {loops}")
        grad_loops = loops if backprop_depth is None else backprop_depth
        if not 0 <= grad_loops <= loops:
            raise ValueError(f"backprop_depth must be in [0, n_loops={loops}], got {backprop_depth}")
        if cache is not None:
            cache.bind_loops(loops)
        outer_grad = torch.is_grad_enabled()

        x = self.embed(input_ids)
        for i, block in enumerate(self.prelude):
            x, _, _ = block(x, self.rope, None, cache, ("prelude", i), start_pos)
        e_inj = self.injection.inject(x).to(x.dtype)
        a_bar = self.injection.a_bar()
        a_bar_c = a_bar.to(x.dtype)

        h = torch.zeros_like(x)
        act = ACTAccumulator(x, self.cfg.act.threshold) if self.halting is not None else None
        aux_total = x.new_zeros((), dtype=torch.float32)
        h_norms, update_norms = [], []
        for t in range(loops):
            carries_grad = t >= loops - grad_loops
            with torch.set_grad_enabled(outer_grad and carries_grad):
                if self.cfg.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                    h_next, aux, counts = checkpoint(self._iterate, h, e_inj, a_bar_c, t, None, start_pos,
                                                     use_reentrant=False)
                else:
                    h_next, aux, counts = self._iterate(h, e_inj, a_bar_c, t, cache, start_pos)
                if carries_grad:
                    aux_total = aux_total + aux
                if act is not None:
                    act.step(self.halting(h_next), h_next, is_last=t == loops - 1)
            if self.training and counts.numel():
                depth = min(t, self.cfg.max_loops - 1)
                for block, block_counts in zip(self.core, counts):
                    block.ffn.expert_counts[depth] += block_counts
            with torch.no_grad():
                h_norms.append(h_next.float().norm(dim=-1).mean())
                update_norms.append((h_next.float() - h.float()).norm(dim=-1).mean())
            h = h_next

        stats = {"h_norm": torch.stack(h_norms), "update_norm": torch.stack(update_norms),
                 "rho_a_bar": a_bar.detach().max()}
        if act is not None:
            out = act.acc.to(x.dtype)
            ponder_cost = self.cfg.act.ponder_cost * act.ponder()
            stats["act_mean_steps"] = act.steps.mean().detach()
        else:
            out = h
            ponder_cost = x.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            if out.shape[1] > 1:
                stats["state_token_cos"] = F.cosine_similarity(out[:, 1:].float(), out[:, :-1].float(), dim=-1).mean()

        for i, block in enumerate(self.coda):
            out, _, _ = block(out, self.rope, None, cache, ("coda", i), start_pos)
        moe_aux_loss = aux_total / max(1, grad_loops * len(self.core)) if self.cfg.moe.enabled else aux_total
        return ModelOutput(logits=self._head(out), moe_aux_loss=moe_aux_loss, ponder_cost=ponder_cost, stats=stats)


def build_model(cfg: ModelConfig, seed: int | None = None) -> MythosModel:
    """Build and initialize the model (fp32, CPU).  ``seed`` makes the initialization independent
    of the global RNG; None draws from it.  Selects the kernel implementation once."""
    select_kernels(cfg.kernels)
    model = MythosModel(cfg)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.reset_parameters(generator)
    return model

"""The Recurrent-Depth Transformer: Prelude -> looped Core (LTI injection, MLA + DeepSeekMoE,
depth-wise LoRA, optional ACT) -> Coda -> RMSNorm -> LM head.

The recurrence (DESIGN.md section 1, Parcae)::

    e = RMSNorm(Prelude(embed(x)))                      # normalized input, B_bar e computed once
    h_0 = 0 (training: N(0, injection.state_init_std^2))
    z_t = A_bar * h_t + B_bar e + loop_emb(t)            # linear in h: no norm on z
    h_{t+1} = z_t + Core_t(z_t)                          # pre-norm blocks normalize their own inputs
    logits = head(Coda(h_T))                             # ACT: Coda(sum_t w_t h_{t+1})

Since rho(A_bar) < 1 and the core's update is bounded, the state is bounded for any T; with the
core's updates at zero it is exactly ``B_bar e (1 - A_bar^T) / (1 - A_bar)``.

API (what ``mythos eval`` / ``mythos generate`` build on)::

    out = model(input_ids, n_loops=T, backprop_depth=k, cache=None, start_pos=0, exit_threshold=None)

- ``n_loops`` (default ``model.default_loops = max(1, max_loops // 2)``): the loop count T.
- ``backprop_depth`` (training): the first ``T - k`` iterations run under ``torch.no_grad()``
  (None: all T carry gradient).  With ``cfg.activation_checkpointing`` each grad-carrying
  iteration is checkpointed, so activation memory grows with k, not T.  ACT halts and charges
  its ponder cost only in those k iterations, where the gradient flows.
- ``eos_id`` (training / validation on packed data): with ``model.attention.document_mask`` a token
  attends only within its own document (documents end at ``eos_id``); ignored with a cache and by
  the adaptive (ACT / KL-exit) inference loop, which see whole rows as one text.
- ``logits=False`` (training): no logits; ``out.hidden`` holds the final-norm states for a loss
  that applies :attr:`MythosModel.head_weight` itself (``train.loss_chunk_tokens``).
- ``cache`` / ``start_pos``: incremental decoding.  ``cache = model.new_cache(batch_size)``, then
  ``model(prompt, T, cache=cache)`` and ``model(next_tokens, T, cache=cache, start_pos=n)`` with
  the same T; the logits equal those of one full forward over the whole sequence (with an ACT
  exit too; with the KL exit, see below).
- ``exit_threshold`` (inference, models without ACT): Huginn's per-token KL exit.  After each
  iteration the coda and head predict from the current states, and a position stops once
  ``KL(p_t || p_{t-1}) < exit_threshold`` (nats; Huginn uses ~5e-4).  0 runs all T loops.  The
  exit check of a position sees its neighbours' current states, so a full-sequence call and
  token-by-token decoding can exit at slightly different iterations.
- ACT models (``model.act.enabled``) in ``eval()`` mode halt per token by their halting unit;
  ``act=False`` runs such a model without it (all T loops, the coda reading ``h_T``; the KL
  exit then applies too), to measure what the halting changes.

Early exit, either way, is per token: an exited position's state is frozen (ACT: its weighted
sum), and the later iterations of the other positions see the keys/values of its last computed
iteration (Huginn's KV sharing; in a cache those entries are copied into the later iterations'
slots).  Batch rows whose positions have all exited are not computed any further: when decoding
one token per row, every exited token saves its remaining iterations.

``out`` is a :class:`ModelOutput`: ``logits`` (B, S, V); ``moe_aux_loss`` and ``ponder_cost``
(scaled, zero when unused); ``loops_used`` (B, S) int64, the iterations each position ran; and
``stats`` (detached, for logging): ``mean_loops``, ``rho_a_bar``, ``state_token_cos`` and, when
all positions run all loops, per iteration ``h_norm`` (mean ||h_{t+1}||), ``update_norm``
(mean ||h_{t+1} - h_t||) and ``state_to_input`` (rms(A_bar h_t) / rms(B_bar e): how loud the
carried state is against the re-injected input) and, from the second iteration on, ``core_change``
(mean ||c_t - c_{t-1}|| / mean ||c_t|| of the core's update ``c_t = h_{t+1} - z_t``).  A
``core_change`` near 0 is the collapse the loop-scaling study measured: the core computes the same
update at every iteration, the state just follows the linear recurrence to ``(B_bar e + c) /
(1 - A_bar)``, and extra loops change nothing.
``with_stats=False`` (the trainer's unlogged steps) leaves out ``state_token_cos`` and the
per-iteration ones: fp32 passes over the full states, which cost memory bandwidth every step.

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
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import KernelDispatch, select_kernels
from mythos_scale.model.attention import build_attention
from mythos_scale.model.cache import KVCache
from mythos_scale.model.doc_attention import DocumentLayout, build_document_layout
from mythos_scale.model.layers import DenseFFN, LoopLinear, RMSNorm, RotaryTable
from mythos_scale.model.moe import MoE, RoutedExperts
from mythos_scale.model.recompute import replayed_in_recompute
from mythos_scale.model.recurrence import ACTAccumulator, FrozenKV, HaltingUnit, LoopEmbedding, LTIInjection, kl_divergence


@dataclass
class ModelOutput:
    """``moe_aux_loss`` and ``ponder_cost`` are already scaled by their config coefficients
    (zero tensors when unused); ``stats`` holds detached tensors for logging."""

    logits: torch.Tensor | None  # None when called with logits=False
    moe_aux_loss: torch.Tensor
    ponder_cost: torch.Tensor
    loops_used: torch.Tensor  # (batch, seq) int64: loop iterations each position ran
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # logits=False: the final-norm states the LM head reads
    # window=True: the final-norm states of the coda's prediction from each grad-carrying
    # iteration, oldest first (the last is ``hidden``)
    window_hidden: list[torch.Tensor] = field(default_factory=list)


class _LoopRun(NamedTuple):
    """What the loop hands the coda: the states, the loops each position ran, and loss terms."""

    out: torch.Tensor
    loops_used: torch.Tensor
    moe_aux: torch.Tensor
    ponder_cost: torch.Tensor
    stats: dict[str, torch.Tensor]
    window: list[torch.Tensor] = []  # window=True: the states after each grad-carrying iteration


class Block(nn.Module):
    """Pre-norm (optionally sandwich-norm) attention + FFN.  Core blocks use MoE and LoRA."""

    def __init__(self, cfg: ModelConfig, core: bool, kernels: KernelDispatch) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg, kernels, cfg.max_loops if core else 0)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, kernels) if core and cfg.moe.enabled else DenseFFN(cfg.dim, cfg.dense_ffn_hidden, kernels)
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.attn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.ffn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: RotaryTable, loop: int | None = None, kv=None, start_pos: int = 0,
                absorb: bool = True, normed: torch.Tensor | None = None, docs: DocumentLayout | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``kv``: this attention's cache (a LayerCache or a stand-in) or None; ``normed``: the
        attention input ``attn_norm(x)`` when already computed (the fused injection does).
        Returns ``(x, moe_aux_loss, expert_counts)``; the last two are None for a dense FFN."""
        a = self.attn(self.attn_norm(x) if normed is None else normed, rope, loop, kv, start_pos, absorb, docs)
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
        # This model's op implementations (model.kernels: fused where built, or the references):
        # every module that runs a fused op holds the same dispatch; another model in the same
        # process can choose differently.
        self.kernels = kernels = select_kernels(cfg.kernels)
        self.default_loops = max(1, cfg.max_loops // 2)
        rope_dim = cfg.attention.qk_rope_head_dim if cfg.attention.type == "mla" else cfg.dim // cfg.n_heads
        self.rope = RotaryTable(rope_dim, cfg.max_seq_len, cfg.attention.rope_theta)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.prelude = nn.ModuleList(Block(cfg, False, kernels) for _ in range(cfg.prelude_layers))
        self.prelude_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.injection = LTIInjection(cfg)
        self.loop_embedding = LoopEmbedding(cfg)
        self.core = nn.ModuleList(Block(cfg, True, kernels) for _ in range(cfg.core_layers))
        self.halting = HaltingUnit(cfg) if cfg.act.enabled else None
        self.coda_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.coda_norm else None
        self.coda = nn.ModuleList(Block(cfg, False, kernels) for _ in range(cfg.coda_layers))
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
                module.dt_bias.fill_(module.dt_bias_for(inj.dt_init))
                module.b.copy_(torch.eye(cfg.dim))
            elif isinstance(module, LoopEmbedding):
                if module.kind == "sinusoidal":
                    module.gain.fill_(module.init_scale(cfg))
                elif module.kind == "learned":
                    normal(module.table, module.init_scale(cfg))
                else:
                    module.zero.zero_()
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

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's (vocab, dim) weight: the embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.head_weight)

    @staticmethod
    def _kv(cache: KVCache | None, key: tuple, rows: torch.Tensor | None = None):
        return cache.layer(key).select(rows) if cache is not None else None

    def _dense_stack(self, x: torch.Tensor, blocks: nn.ModuleList, part: str, cache: KVCache | None,
                     start_pos: int, rows: torch.Tensor | None = None, docs: DocumentLayout | None = None,
                     ) -> torch.Tensor:
        absorb = cache.absorb if cache is not None else True
        for i, block in enumerate(blocks):
            x, _, _ = block(x, self.rope, None, self._kv(cache, (part, i), rows), start_pos, absorb, docs=docs)
        return x

    def _coda(self, h: torch.Tensor, cache: KVCache | None, start_pos: int, rows: torch.Tensor | None = None,
              docs: DocumentLayout | None = None) -> torch.Tensor:
        """The coda over the loop's output (after ``coda_norm`` when the model has one)."""
        h = h if self.coda_norm is None else self.coda_norm(h)
        return self._dense_stack(h, self.coda, "coda", cache, start_pos, rows, docs)

    def _coda_logits(self, h: torch.Tensor, cache: KVCache | None, start_pos: int,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        return self._head(self._coda(h, cache, start_pos, rows))

    def _iterate(self, h: torch.Tensor, e_inj: torch.Tensor, a_bar: torch.Tensor, loop: int, kv: list | None,
                 start_pos: int, absorb: bool = True, docs: DocumentLayout | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One loop iteration ``h -> z + Core(z)``, ``z = A_bar h + B_bar e + loop_emb(t)``: the injection
        is fused with the first block's attention pre-norm; ``z`` itself is not normalized.  ``kv``:
        one cache (or stand-in) per core layer, or None.
        Returns ``(h_next, summed moe aux loss, expert counts (R, E) or empty)``."""
        first = self.core[0]
        x, normed = self.kernels.inject_rmsnorm(h, e_inj, a_bar, self.loop_embedding(loop).to(h.dtype),
                                         first.attn_norm.weight, self.cfg.norm_eps)
        aux = h.new_zeros((), dtype=torch.float32)
        counts = []
        for i, block in enumerate(self.core):
            x, block_aux, block_counts = block(x, self.rope, loop, kv[i] if kv is not None else None, start_pos,
                                               absorb, normed if i == 0 else None, docs)
            if block_aux is not None:
                aux = aux + block_aux
                counts.append(block_counts)
        return x, aux, torch.stack(counts) if counts else h.new_zeros(0)

    def forward(self, input_ids: torch.Tensor, n_loops: int | None = None, backprop_depth: int | None = None,
                cache: KVCache | None = None, start_pos: int = 0, exit_threshold: float | None = None,
                act: bool = True, with_stats: bool = True, eos_id: int | None = None,
                logits: bool = True, window: bool = False) -> ModelOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        n_loops = self.default_loops if n_loops is None else n_loops
        if n_loops < 1:
            raise ValueError(f"n_loops must be >= 1, got {n_loops}")
        backprop_depth = n_loops if backprop_depth is None else backprop_depth
        if not 0 <= backprop_depth <= n_loops:
            raise ValueError(f"backprop_depth must be in [0, n_loops={n_loops}], got {backprop_depth}")
        if exit_threshold is not None:
            if self.training:
                raise ValueError("exit_threshold (the KL early exit) is for inference: call model.eval() first")
            if self.halting is not None and act:
                raise ValueError("exit_threshold: this model halts by ACT (model.act.enabled); "
                                 "the KL exit applies to models without ACT (or to act=False)")
            if exit_threshold < 0:
                raise ValueError(f"exit_threshold must be >= 0 (0 = run all loops), got {exit_threshold}")
        if cache is not None:
            cache.bind_loops(n_loops)

        docs = (build_document_layout(input_ids, eos_id, self.cfg.attention.kernel)
                if eos_id is not None and self.cfg.attention.document_mask and cache is None else None)
        e = self.prelude_norm(self._dense_stack(self.embed(input_ids), self.prelude, "prelude", cache, start_pos,
                                                docs=docs))
        e_inj = self.injection.inject(e).to(e.dtype)
        a_bar = self.injection.a_bar()
        halting = self.halting if act else None
        if not self.training and (halting is not None or exit_threshold is not None):
            run = self._adaptive_loops(e, e_inj, a_bar.to(e.dtype), n_loops, cache, start_pos, exit_threshold, halting)
        else:
            if window and (halting is not None or cache is not None):
                raise ValueError("window=True (train.loops.window_loss) needs a model without ACT and no cache")
            run = self._loops(e, e_inj, a_bar.to(e.dtype), n_loops, backprop_depth, cache, start_pos, halting, with_stats,
                              docs, window)
        stats = dict(run.stats, rho_a_bar=a_bar.detach().max(), mean_loops=run.loops_used.float().mean())
        with torch.no_grad():
            if with_stats and run.out.shape[1] > 1:
                stats["state_token_cos"] = F.cosine_similarity(run.out[:, 1:].float(), run.out[:, :-1].float(),
                                                               dim=-1).mean()
        moe_aux_loss = run.moe_aux / max(1, backprop_depth * len(self.core)) if self.cfg.moe.enabled else run.moe_aux
        hidden = self.norm(self._coda(run.out, cache, start_pos, docs=docs))
        window_hidden = [self.norm(self._coda(h, None, start_pos, docs=docs)) for h in run.window[:-1]] + [hidden]
        return ModelOutput(logits=F.linear(hidden, self.head_weight) if logits else None, moe_aux_loss=moe_aux_loss,
                           ponder_cost=run.ponder_cost, loops_used=run.loops_used, stats=stats,
                           hidden=None if logits else hidden, window_hidden=window_hidden if run.window else [])

    def _initial_state(self, e: torch.Tensor) -> torch.Tensor:
        std = self.cfg.injection.state_init_std
        if self.training and std > 0:
            return torch.randn_like(e) * std
        return torch.zeros_like(e)

    def _loops(self, e: torch.Tensor, e_inj: torch.Tensor, a_bar: torch.Tensor, n_loops: int, backprop_depth: int,
               cache: KVCache | None, start_pos: int, halting: HaltingUnit | None, with_stats: bool = True,
               docs: DocumentLayout | None = None, window: bool = False) -> _LoopRun:
        """All positions run all ``n_loops`` iterations (training, and inference without early exit).
        ``with_stats``: compute the per-iteration statistics (fp32 passes over the full states).
        ``window``: also return the state after each grad-carrying iteration (``_LoopRun.window``).

        Truncated backprop: the first ``n_loops - backprop_depth`` run without grad.  ACT halts and charges
        only in the grad-carrying window (its last iteration at least): a position halted in the
        no-grad part would hand the loss a constant and cut every gradient, halting included.
        """
        outer_grad = torch.is_grad_enabled()
        absorb = cache.absorb if cache is not None else True
        h = self._initial_state(e)
        act_start = min(n_loops - backprop_depth, n_loops - 1)
        act = ACTAccumulator(e, self.cfg.act.threshold, self.kernels) if halting is not None else None
        aux_total = e.new_zeros((), dtype=torch.float32)
        iteration_stats = _IterationStats(e_inj, a_bar, self.loop_embedding) if with_stats else None
        states = []
        for t in range(n_loops):
            carries_grad = t >= n_loops - backprop_depth
            if iteration_stats is not None:
                iteration_stats.before(h)
            with torch.set_grad_enabled(outer_grad and carries_grad):
                if self.cfg.activation_checkpointing and torch.is_grad_enabled() and cache is None:
                    h_next, aux, counts = checkpoint(replayed_in_recompute(self._iterate), h, e_inj, a_bar, t,
                                                     None, start_pos, True, docs, use_reentrant=False)
                else:
                    kv = ([self._kv(cache, ("core", t, i)) for i in range(len(self.core))]
                          if cache is not None else None)
                    h_next, aux, counts = self._iterate(h, e_inj, a_bar, t, kv, start_pos, absorb, docs)
                if carries_grad:
                    aux_total = aux_total + aux
                if act is not None and t >= act_start:
                    act.step(halting(h_next), h_next, is_last=t == n_loops - 1)
            if self.training and counts.numel():
                for block, block_counts in zip(self.core, counts):
                    block.ffn.expert_counts[block.ffn.depth_row(t)] += block_counts
            if iteration_stats is not None:
                iteration_stats.after(t, h, h_next)
            if window and carries_grad:
                states.append(h_next)
            h = h_next

        stats = iteration_stats.result() if iteration_stats is not None else {}
        if act is None:
            return _LoopRun(h, torch.full(h.shape[:-1], n_loops, device=h.device), aux_total,
                            e.new_zeros((), dtype=torch.float32), stats, states)
        return _LoopRun(act.acc.to(e.dtype), (act_start + act.steps).long(), aux_total,
                        self.cfg.act.ponder_cost * act.ponder(), stats)

    @torch.no_grad()
    def _adaptive_loops(self, e: torch.Tensor, e_inj: torch.Tensor, a_bar: torch.Tensor, n_loops: int,
                        cache: KVCache | None, start_pos: int, exit_threshold: float | None,
                        halting: HaltingUnit | None) -> _LoopRun:
        """Inference with per-token early exit: ACT halting, or the KL exit (Huginn) when
        ``KL(p_t || p_{t-1}) < exit_threshold`` between the output distributions of two successive
        iterations.  An exited position stops: its state is frozen and later iterations of the
        others see its last keys/values (:class:`FrozenKV`).  Batch rows whose positions have all
        exited are dropped from the computation (with one token per row, as when decoding, that is
        per token).  Returns the frozen states (ACT: the weighted ones) and the loops each ran."""
        bsz = e.shape[0]
        absorb = cache.absorb if cache is not None else False
        h = torch.zeros_like(e)
        running = torch.ones(e.shape[:-1], dtype=torch.bool, device=e.device)
        loops_used = torch.zeros(e.shape[:-1], dtype=torch.long, device=e.device)
        act = ACTAccumulator(e, self.cfg.act.threshold, self.kernels) if halting is not None else None
        kv_last: list[list[torch.Tensor] | None] = [None] * len(self.core)
        prev_logp = None
        for t in range(n_loops):
            row_running = running.any(dim=1)
            rows = row_running.nonzero().squeeze(1)  # a host sync: the point is to skip work
            if cache is not None and rows.numel() < bsz:  # finished rows keep their last entries
                done = (~row_running).nonzero().squeeze(1)
                for i, last in enumerate(kv_last):
                    cache.layer(("core", t, i)).write(start_pos, *[k[done] for k in last], rows=done)
            if rows.numel() == 0:
                continue
            subset = None if rows.numel() == bsz else rows
            pick = (lambda x: x) if subset is None else (lambda x: x[rows])
            views = [FrozenKV(~pick(running), None if last is None else [pick(k) for k in last],
                              cache.layer(("core", t, i)) if cache is not None else None, subset)
                     for i, last in enumerate(kv_last)]
            h_new, _, _ = self._iterate(pick(h), pick(e_inj), a_bar, t, views, start_pos, absorb)
            for i, view in enumerate(views):
                if kv_last[i] is None:
                    kv_last[i] = view.new
                else:
                    for full, new in zip(kv_last[i], view.new):
                        full[rows] = new
            live = pick(running)
            h[rows] = torch.where(live.unsqueeze(-1), h_new, pick(h))
            loops_used[rows] += live.long()
            if act is not None:
                halts = act.step(halting(h_new), h_new, is_last=t == n_loops - 1, rows=rows)
                running[rows] = live & ~halts
            elif t < n_loops - 1:  # the KL exit: compare this iteration's prediction with the last one's
                logp = F.log_softmax(self._coda_logits(h[rows], cache, start_pos, subset).float(), dim=-1)
                if prev_logp is None:
                    prev_logp = logp
                else:
                    running[rows] = live & ~(kl_divergence(logp, prev_logp[rows]) < exit_threshold)
                    prev_logp[rows] = logp
        zero = e.new_zeros((), dtype=torch.float32)
        if act is None:
            return _LoopRun(h, loops_used, zero, zero, {})
        return _LoopRun(act.acc.to(e.dtype), loops_used, zero, self.cfg.act.ponder_cost * act.ponder(), {})


class _IterationStats:
    """The per-iteration statistics of a forward (``h_norm``, ``update_norm``, ``state_to_input``,
    ``core_change``; see the module docstring): fp32 passes over the full states, so the trainer
    asks for them on logged steps only."""

    def __init__(self, e_inj: torch.Tensor, a_bar: torch.Tensor, loop_embedding: LoopEmbedding) -> None:
        self.e_inj, self.a_bar, self.loop_embedding = e_inj, a_bar, loop_embedding
        with torch.no_grad():
            self.input_rms = e_inj.float().pow(2).mean().sqrt().clamp_min(1e-12)
        self.h_norms, self.update_norms, self.state_to_input, self.core_change = [], [], [], []
        self.prev_core: torch.Tensor | None = None

    @torch.no_grad()
    def before(self, h: torch.Tensor) -> None:
        self.state_to_input.append((self.a_bar * h).float().pow(2).mean().sqrt() / self.input_rms)

    @torch.no_grad()
    def after(self, t: int, h: torch.Tensor, h_next: torch.Tensor) -> None:
        self.h_norms.append(h_next.float().norm(dim=-1).mean())
        self.update_norms.append((h_next.float() - h.float()).norm(dim=-1).mean())
        z = self.a_bar.float() * h.float() + self.e_inj.float() + self.loop_embedding(t).float()
        core = h_next.float() - z  # Core_t(z_t): what this iteration computed
        if self.prev_core is not None:
            self.core_change.append((core - self.prev_core).norm(dim=-1).mean()
                                    / core.norm(dim=-1).mean().clamp_min(1e-12))
        self.prev_core = core

    def result(self) -> dict[str, torch.Tensor]:
        stats = {"h_norm": torch.stack(self.h_norms), "update_norm": torch.stack(self.update_norms),
                 "state_to_input": torch.stack(self.state_to_input)}
        if self.core_change:
            stats["core_change"] = torch.stack(self.core_change)
        return stats


def build_model(cfg: ModelConfig, seed: int | None = None) -> MythosModel:
    """Build and initialize the model (fp32, CPU).  ``seed`` makes the initialization independent
    of the global RNG; None draws from it."""
    model = MythosModel(cfg)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.reset_parameters(generator)
    return model

"""Attention: Multi-head Latent Attention (DeepSeek-V2) and grouped-query attention.

Both take ``(x, rope, loop, cache, start_pos)``: ``loop`` selects the depth-wise LoRA adapter
(None outside the core), ``cache`` is a :class:`~mythos_scale.model.cache.LayerCache` or None.
Plain causal attention always goes through SDPA's ``is_causal``; only a chunk appended to a
non-empty cache needs an explicit (chunk x context) boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import KernelDispatch
from mythos_scale.model.cache import LayerCache
from mythos_scale.model.doc_attention import DocumentLayout, document_attention
from mythos_scale.model.layers import LoopLinear, RMSNorm, RotaryTable


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, scale: float,
            docs: DocumentLayout | None = None) -> torch.Tensor:
    """SDPA over (B, H, S, *) queries and (B, H or 1, L, *) keys/values, causal at offset ``start_pos``.

    Values narrower than the queries (MLA: v_head_dim < qk head dim) are zero-padded to the query
    width and the output sliced back: the flash kernels (CPU and CUDA) need equal head dims, and
    without them SDPA falls back to a slower path that materializes the causal mask.
    ``docs`` (no cache): mask packed documents from each other (:mod:`~mythos_scale.model.doc_attention`).
    """
    seq, ctx = q.shape[2], k.shape[2]
    if docs is not None and seq == ctx:
        if k.shape[1] != q.shape[1]:
            k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
        return document_attention(q, k, v, docs, scale)
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    if k.shape[1] != q.shape[1]:
        k = k.expand(-1, q.shape[1], -1, -1)
        v = v.expand(-1, q.shape[1], -1, -1)
    if seq == ctx:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif seq == 1:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        allowed = (torch.arange(ctx, device=q.device)[None, :]
                   <= torch.arange(start_pos, start_pos + seq, device=q.device)[:, None])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out[..., :v_dim]


class MLA(nn.Module):
    """Multi-head Latent Attention with a decoupled RoPE key shared by all heads.

    Training / prefill expands ``c_KV`` into per-head keys and values.  With a cache and
    ``absorb=True`` the query is folded into the latent space (``q_nope W_UK``) so attention
    runs directly against cached ``c_KV`` as one shared key/value head, and ``W_UV`` is applied
    to the attended latent per head before the output projection.

    The forward takes the number of heads from the projections' shapes, never from the config:
    under tensor parallelism this module holds ``n_heads / tp`` of them.
    """

    def __init__(self, cfg: ModelConfig, kernels: KernelDispatch, max_loops: int = 0) -> None:
        super().__init__()
        self.kernels = kernels
        a = cfg.attention
        n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.kv_rank = a.kv_lora_rank
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        targets = cfg.lora_targets
        lora = cfg.lora_rank

        def proj(i: int, o: int, target: str | None) -> LoopLinear:
            return LoopLinear(i, o, max_loops if target in targets else 0, lora)

        q_out = n_heads * (self.nope_dim + self.rope_dim)
        if a.q_lora_rank > 0:
            self.wq_a = proj(cfg.dim, a.q_lora_rank, None)
            self.q_norm = RMSNorm(a.q_lora_rank, cfg.norm_eps)
            self.wq_b = proj(a.q_lora_rank, q_out, "q")
        else:
            self.wq = proj(cfg.dim, q_out, "q")
        self.wkv_a = proj(cfg.dim, self.kv_rank + self.rope_dim, "kv")
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wkv_b = proj(self.kv_rank, n_heads * (self.nope_dim + self.v_dim), None)
        self.wo = proj(n_heads * self.v_dim, cfg.dim, "o")
        self.wo.is_output_projection = True

    def _query(self, x: torch.Tensor, loop: int | None) -> torch.Tensor:
        if hasattr(self, "wq"):
            return self.wq(x, loop)
        return self.wq_b(self.q_norm(self.wq_a(x, loop)), loop)

    def _shared_rope_key(self, k_rope: torch.Tensor) -> torch.Tensor:
        """The rope key as all of this module's heads use it (one tensor for every head).  The
        tensor-parallel pass overrides this: a rank's heads contribute only part of its gradient."""
        return k_rope

    def forward(self, x: torch.Tensor, rope: RotaryTable, loop: int | None = None,
                cache: LayerCache | None = None, start_pos: int = 0, absorb: bool = True,
                docs: DocumentLayout | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        cos, sin = rope(start_pos, seq)
        q = self._query(x, loop).view(bsz, seq, -1, self.nope_dim + self.rope_dim)
        n_heads = q.shape[2]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.kernels.apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.wkv_a(x, loop).split([self.kv_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_rope = self.kernels.apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        if cache is not None:
            c_kv, k_rope = cache.update(start_pos, c_kv, k_rope)
        ctx = c_kv.shape[1]
        w_kv_b = self.wkv_b.weight.view(n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_kv_b.split([self.nope_dim, self.v_dim], dim=1)
        if cache is not None and absorb:
            q_latent = torch.einsum("bshd,hdr->bhsr", q_nope, w_uk)
            query = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)
            key = torch.cat((c_kv, k_rope), dim=-1).unsqueeze(1)
            out_latent = _attend(query, key, c_kv.unsqueeze(1), start_pos, self.scale)
            out = torch.einsum("bhsr,hvr->bshv", out_latent, w_uv)
        else:
            kv = self.wkv_b(c_kv).view(bsz, ctx, n_heads, self.nope_dim + self.v_dim)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
            k_rope = self._shared_rope_key(k_rope).unsqueeze(2).expand(-1, -1, n_heads, -1)
            k = torch.cat((k_nope, k_rope), dim=-1)
            query = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
            out = _attend(query, k.transpose(1, 2), v.transpose(1, 2), start_pos, self.scale, docs).transpose(1, 2)
        return self.wo(out.reshape(bsz, seq, n_heads * self.v_dim), loop)


class GQA(nn.Module):
    """Grouped-query attention, RoPE over the whole head; the cache holds rotated keys and values."""

    def __init__(self, cfg: ModelConfig, kernels: KernelDispatch, max_loops: int = 0) -> None:
        super().__init__()
        self.kernels = kernels
        n_heads, n_kv_heads = cfg.n_heads, cfg.attention.n_kv_heads
        self.head_dim = cfg.dim // n_heads
        targets, lora = cfg.lora_targets, cfg.lora_rank

        def proj(i: int, o: int, target: str) -> LoopLinear:
            return LoopLinear(i, o, max_loops if target in targets else 0, lora)

        self.wq = proj(cfg.dim, n_heads * self.head_dim, "q")
        self.wkv = proj(cfg.dim, 2 * n_kv_heads * self.head_dim, "kv")
        self.wo = proj(n_heads * self.head_dim, cfg.dim, "o")
        self.wo.is_output_projection = True

    def forward(self, x: torch.Tensor, rope: RotaryTable, loop: int | None = None,
                cache: LayerCache | None = None, start_pos: int = 0, absorb: bool = True,
                docs: DocumentLayout | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        cos, sin = rope(start_pos, seq)
        q = self.kernels.apply_rope(self.wq(x, loop).view(bsz, seq, -1, self.head_dim), cos, sin)
        k, v = self.wkv(x, loop).view(bsz, seq, -1, self.head_dim).chunk(2, dim=2)
        k = self.kernels.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        group = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(group, dim=2) if group > 1 else k
        v = v.repeat_interleave(group, dim=2) if group > 1 else v
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start_pos, self.head_dim ** -0.5,
                      docs)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1), loop)


def build_attention(cfg: ModelConfig, kernels: KernelDispatch, max_loops: int = 0) -> nn.Module:
    """MLA or GQA per ``cfg.attention.type``; ``max_loops > 0`` adds depth-wise LoRA adapters."""
    return MLA(cfg, kernels, max_loops) if cfg.attention.type == "mla" else GQA(cfg, kernels, max_loops)

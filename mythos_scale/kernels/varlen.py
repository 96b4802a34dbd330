"""The flash-attn varlen kernel as the custom op ``mythos::varlen_attention`` (+ its backward op),
used by document-masked attention on CUDA (:mod:`mythos_scale.model.doc_attention`).

Fake implementations let fake-CUDA tracing and ``torch.compile`` see through it; the CPU
implementation is the reference math, so its autograd is tested on CPU.  flash-attn 2 needs equal
q/k and v head sizes: MLA's smaller V is zero-padded to the q/k width for it (the pad is sliced
off the output).  Registered when :mod:`mythos_scale.kernels` is imported; the Hugging Face export
bundles only the reference kernels and never registers it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segment_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total, total) bool: causal within the sequences ``cu_seqlens`` delimits (reference path)."""
    position = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens, position, right=True)
    return (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool,
                                                               device=cu_seqlens.device).tril()


def _reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain math of the varlen op on (T, H, D) tensors: output (T, H, Dv) and the fp32
    log-sum-exp (H, T) of the scores, as flash-attn returns them."""
    mask = _segment_mask(cu_seqlens, q.shape[0])
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("thd,shd->hts", q.to(compute), k.to(compute)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hts,shd->thd", torch.exp(scores - lse[..., None]), v.to(compute))
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def _reference_varlen_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax-attention backward from the saved log-sum-exp, as flash-attn computes it
    (a custom op's implementation runs below autograd, so it is written out)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, out, grad_out = (t.to(compute) for t in (q, k, v, out, grad_out))
    mask = _segment_mask(cu_seqlens, q.shape[0])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    probs = torch.exp(scores.masked_fill(~mask, float("-inf")) - lse.to(compute)[..., None])
    grad_v = torch.einsum("hts,thd->shd", probs, grad_out)
    grad_probs = torch.einsum("thd,shd->hts", grad_out, v)
    row_dot = (grad_out * out).sum(-1).transpose(0, 1)  # (H, T)
    grad_scores = probs * (grad_probs - row_dot[..., None]) * scale
    grad_q = torch.einsum("hts,shd->thd", grad_scores, k)
    grad_k = torch.einsum("hts,thd->shd", grad_scores, q)
    return tuple(g.to(dtype).contiguous() for g, dtype in zip((grad_q, grad_k, grad_v), dtypes))


def _pad_v(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn 2 takes one head size for q, k and v: zero-pad a narrower V to the q/k width."""
    return F.pad(v, (0, q.shape[-1] - v.shape[-1])) if v.shape[-1] < q.shape[-1] else v


@torch.library.custom_op("mythos::varlen_attention", mutates_args=(), device_types=("cpu", "cuda"))
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each sequence of a flattened (T, H, D) batch: ``(out (T, H, Dv),
    lse (H, T) fp32)``.  CUDA: flash-attn's varlen kernel; CPU: the reference math."""
    if not q.is_cuda:
        return _reference_varlen(q, k, v, cu_seqlens, scale)
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward
    out, lse, *_ = _flash_attn_varlen_forward(q, k, _pad_v(q, v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                              0.0, scale, True)
    return out[..., :v.shape[-1]].contiguous(), lse


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty((*q.shape[:2], v.shape[-1])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mythos::varlen_attention_backward", mutates_args=(), device_types=("cpu", "cuda"))
def varlen_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`varlen_attention`."""
    if not q.is_cuda:
        return _reference_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens, scale)
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward
    v_dim = v.shape[-1]
    v_padded, out_padded, grad_padded = _pad_v(q, v), _pad_v(q, out), _pad_v(q, grad_out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v_padded)
    _flash_attn_varlen_backward(grad_padded.contiguous(), q, k, v_padded, out_padded.contiguous(), lse, dq, dk, dv,
                                cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, scale, True,
                                -1, -1, 0.0, None, False)
    return dq, dk, dv[..., :v_dim].contiguous()


@varlen_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


varlen_attention.register_autograd(_backward, setup_context=_setup_context)

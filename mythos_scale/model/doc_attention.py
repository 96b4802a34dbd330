"""Document-aware causal attention for packed sequences (``model.attention.document_mask``).

The data path packs documents back to back with the end-of-document token (EOS) after each, so
a plain causal mask lets a token attend into the unrelated documents packed before it.  Here a
token attends only to earlier tokens of its own document: a document is the run of tokens up to
and including an EOS.  Positions (RoPE) are not reset: within one document the mask changes
nothing, and across documents it cuts every path.

Two implementations of the same mask, chosen per model by ``model.attention.kernel``
(:func:`resolve_attention_kernel`, logged once):

- ``sdpa``: SDPA with a (B, 1, S, S) block-diagonal causal boolean mask (the CPU path and the
  reference).
- ``flash`` (CUDA with flash-attn installed): the varlen kernel over the flattened batch, with
  ``cu_seqlens`` built on the device without a host sync (:func:`varlen_metadata`: a fixed
  length ``B*S + 1``, unused entries repeat the total, i.e. empty sequences, and ``max_seqlen`` is
  the row length S, an upper bound known on the host).  The kernel is the custom op
  ``mythos::varlen_attention`` (+ its backward op) with fake implementations, so fake-CUDA
  tracing and ``torch.compile`` see through it, and a CPU implementation (the reference math) so
  its autograd is tested on CPU.  flash-attn 2 needs equal q/k and v head sizes: MLA's smaller V
  is zero-padded to the q/k width for it (the pad is sliced off the output).

``auto`` picks ``flash`` on CUDA when flash-attn imports, else ``sdpa``; asking for flash where it
cannot run falls back to ``sdpa`` with one warning (same numbers up to kernel rounding).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def flash_attn_available() -> bool:
    """Whether flash-attn (2.x, the ``flash_attn`` package with its CUDA extension) is installed."""
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def resolve_attention_kernel(choice: str, device_type: str) -> str:
    """``flash`` or ``sdpa`` for ``model.attention.kernel`` = ``choice`` on ``device_type``; logged
    once per (choice, device), and a flash request that cannot run warns once."""
    flash_possible = device_type == "cuda" and flash_attn_available()
    kernel = "flash" if choice in ("auto", "flash") and flash_possible else "sdpa"
    if choice == "flash" and kernel != "flash":
        why = "flash-attn is not installed" if device_type == "cuda" else f"the device is {device_type}"
        log.warning("model.attention.kernel=flash: %s; document-masked attention falls back to SDPA "
                    "with the same mask", why)
    elif choice == "auto" and device_type == "cuda" and not flash_possible:
        log.warning("flash-attn is not installed: document-masked attention runs SDPA with an explicit "
                    "(S x S) mask; pip install '.[gpu]' for the varlen kernel")
    log.info("document-masked attention kernel on %s: %s (model.attention.kernel=%s)", device_type, kernel, choice)
    return kernel


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, S) int64: the index of each token's document in its row (an EOS ends its document)."""
    is_eos = (input_ids == eos_id).long()
    return is_eos.cumsum(dim=1) - is_eos


def varlen_metadata(doc_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (int32, ``B*S + 1``) of the documents of the flattened (B*S) batch, on the
    device of ``doc_ids`` and without a host sync: the document starts, sorted, then the total
    repeated (zero-length sequences the kernel skips)."""
    bsz, seq = doc_ids.shape
    total = bsz * seq
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat_index = torch.arange(total, device=doc_ids.device, dtype=torch.int32)
    keyed = torch.where(starts.flatten(), flat_index, torch.full_like(flat_index, total))
    return torch.cat((keyed.sort().values, keyed.new_full((1,), total)))


@dataclass
class DocumentLayout:
    """What attention needs to mask documents in one forward: the document index of every token
    and the kernel; the mask or the varlen metadata are built once and shared by every layer."""

    doc_ids: torch.Tensor
    kernel: str

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """(B, 1, S, S) bool: query i sees key j iff j <= i and both are in one document."""
        seq = self.doc_ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=self.doc_ids.device).tril()
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        return (same & causal).unsqueeze(1)

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        return varlen_metadata(self.doc_ids)


def build_document_layout(input_ids: torch.Tensor, eos_id: int, kernel_choice: str) -> DocumentLayout:
    return DocumentLayout(document_ids(input_ids, eos_id),
                          resolve_attention_kernel(kernel_choice, input_ids.device.type))


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocumentLayout,
                       scale: float) -> torch.Tensor:
    """Document-masked causal attention of (B, H, S, D) q/k and (B, H, S, Dv) v (equal H)."""
    if docs.kernel == "flash" and q.is_cuda:
        bsz, heads, seq, _ = q.shape

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(bsz * seq, heads, t.shape[-1])

        out, _ = varlen_attention(flat(q), flat(k), flat(v), docs.cu_seqlens, seq, scale)
        return out.view(bsz, seq, heads, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask, scale=scale)


# --------------------------------------------------------------------------- the varlen op


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

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
  ``mythos::varlen_attention`` (:mod:`mythos_scale.kernels.varlen`, registered with the other
  kernels).

``auto`` picks ``flash`` on CUDA when flash-attn imports, else ``sdpa``; asking for flash where it
cannot run falls back to ``sdpa`` with one warning (same numbers up to kernel rounding).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field

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
    flash_possible = (device_type == "cuda" and flash_attn_available()
                      and hasattr(torch.ops.mythos, "varlen_attention"))  # not in the HF export's bundle
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
    """What attention needs to mask documents in one forward: the document index of every token,
    the kernel, and what that kernel reads, built once here (not lazily: torch.compile cannot
    trace the lock of a cached property) and shared by every layer: ``cu_seqlens`` always (cheap,
    no host sync) and the (B, 1, S, S) mask only where SDPA will run."""

    doc_ids: torch.Tensor
    kernel: str
    cu_seqlens: torch.Tensor = field(init=False)
    mask: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.cu_seqlens = varlen_metadata(self.doc_ids)
        sdpa_runs = self.kernel == "sdpa" or not self.doc_ids.is_cuda
        self.mask = document_mask(self.doc_ids) if sdpa_runs else None


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool: query i sees key j iff j <= i and both are in one document."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal).unsqueeze(1)


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

        out, _ = torch.ops.mythos.varlen_attention(flat(q), flat(k), flat(v), docs.cu_seqlens, seq, scale)
        return out.view(bsz, seq, heads, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask, scale=scale)

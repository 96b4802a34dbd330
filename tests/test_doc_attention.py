"""Document-aware causal attention (model.attention.document_mask): a token never attends across
an end-of-document token; the SDPA mask and the varlen op agree; the varlen metadata is built
without a host sync on (fake) CUDA."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from mythos_scale.config import ModelConfig
from mythos_scale.kernels.varlen import varlen_attention
from mythos_scale.model import build_model
from mythos_scale.model.doc_attention import (
    DocumentLayout,
    document_attention,
    document_ids,
    resolve_attention_kernel,
    varlen_metadata,
)

EOS = 1


def tiny(attention_type: str, document_mask: bool = True, moe: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_heads=2, dense_ffn_hidden=32, max_loops=2, max_seq_len=32,
                       lora_rank=2, moe={"enabled": moe, "n_routed_experts": 4, "expert_hidden": 16},
                       attention={"type": attention_type, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                  "qk_rope_head_dim": 4, "v_head_dim": 8, "document_mask": document_mask})


@pytest.mark.parametrize("attention_type", ["mla", "gqa"])
def test_later_document_is_bitwise_independent_of_the_earlier_one(attention_type):
    """Two rows that differ only in their first document: every token of the second document
    has bitwise equal logits; without the mask (adversarial) they differ.  The core is dense here:
    an MoE's per-expert GEMM sizes follow the other document's routing, and a multi-threaded GEMM
    of another size may round a row differently (not an attention leak)."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    first_a, first_b = torch.randint(2, 64, (2, 7), generator=gen)
    later = torch.randint(2, 64, (12,), generator=gen)
    rows = [torch.cat((first, torch.tensor([EOS]), later)).unsqueeze(0) for first in (first_a, first_b)]
    for document_mask in (True, False):
        model = build_model(tiny(attention_type, document_mask, moe=False), seed=0).eval()
        with torch.no_grad():
            out_a, out_b = (model(row, n_loops=2, eos_id=EOS).logits[0, 8:] for row in rows)
        assert torch.equal(out_a, out_b) == document_mask


def test_no_eos_gives_plain_causal_attention():
    model = build_model(tiny("mla"), seed=0).eval()
    tokens = torch.randint(2, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, eos_id=EOS).logits, model(tokens).logits, rtol=1e-5, atol=1e-6)


def test_document_ids_and_varlen_metadata():
    tokens = torch.tensor([[5, EOS, 6, 7], [EOS, 8, 9, EOS]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    cu = varlen_metadata(document_ids(tokens, EOS))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 4, 5, 8, 8, 8, 8, 8]


def qkv(total: int = 10, heads: int = 2, qk_dim: int = 12, v_dim: int = 8, **kw) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(total, heads, d, generator=gen, **kw) for d in (qk_dim, qk_dim, v_dim)]


def test_varlen_op_matches_the_sdpa_mask_forward_and_backward():
    """The varlen op (flattened batch, cu_seqlens) equals SDPA with the block-diagonal mask, with
    MLA's narrower V, values and gradients; torch.library.opcheck checks its fake and autograd."""
    tokens = torch.tensor([[5, 6, EOS, 7, 8], [9, EOS, EOS, 3, 4]])
    docs = DocumentLayout(document_ids(tokens, EOS), "sdpa")
    q, k, v = (t.requires_grad_() for t in qkv(dtype=torch.float64))
    out, lse = varlen_attention(q, k, v, docs.cu_seqlens, 5, 0.3)

    def batched(t):
        return t.detach().view(2, 5, *t.shape[1:]).transpose(1, 2).requires_grad_()
    qb, kb, vb = map(batched, (q, k, v))
    ref = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=docs.mask, scale=0.3)
    torch.testing.assert_close(out.view(2, 5, 2, 8).transpose(1, 2), ref)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.transpose(1, 2).reshape_as(out))
    for mine, theirs in ((q, qb), (k, kb), (v, vb)):
        torch.testing.assert_close(mine.grad.view(2, 5, *mine.shape[1:]).transpose(1, 2), theirs.grad)
    torch.library.opcheck(varlen_attention, (*qkv(dtype=torch.float64, requires_grad=True),
                                             docs.cu_seqlens, 5, 0.3))


def test_varlen_path_on_fake_cuda_without_host_sync():
    """Metadata and the flash path's op on fake CUDA: any host sync (nonzero, item) would raise,
    as the adversarial line shows; the output keeps V's head size (padding is internal)."""
    with FakeTensorMode(), torch.device("cuda"):
        tokens = torch.randint(0, 64, (2, 64))
        ids = document_ids(tokens, EOS)
        with pytest.raises(DynamicOutputShapeException):
            (ids[:, 1:] != ids[:, :-1]).nonzero()  # what a naive cu_seqlens build would do
        docs = DocumentLayout(ids, "flash")
        assert docs.cu_seqlens.shape == (2 * 64 + 1,) and docs.cu_seqlens.device.type == "cuda"
        q, k = (torch.randn(2, 4, 64, 24, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(2, 4, 64, 16, dtype=torch.bfloat16)
        out = document_attention(q, k, v, docs, 24 ** -0.5)
        assert out.shape == (2, 4, 64, 16) and out.device.type == "cuda"


def test_kernel_choice_falls_back_with_one_warning(caplog):
    resolve_attention_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="mythos_scale.model.doc_attention"):
        assert resolve_attention_kernel("flash", "cpu") == "sdpa"
        assert resolve_attention_kernel("flash", "cpu") == "sdpa"
        assert resolve_attention_kernel("auto", "cpu") == "sdpa"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falls back to SDPA" in warnings[0].getMessage()
    assert any("kernel on cpu: sdpa" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (launch/gpu_check.sh runs it on one)")
def test_flash_matches_sdpa_on_cuda():
    """flash-attn's varlen kernel (MLA head sizes: q/k 96, V 64) against SDPA with the document
    mask, bf16, forward and backward.  Fails, not skips, on a GPU without flash-attn."""
    assert resolve_attention_kernel("flash", "cuda") == "flash", "flash-attn is not installed"
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(2, 64, (2, 512), device="cuda", generator=gen)
    tokens[0, [100, 300]] = EOS
    tokens[1, 7] = EOS
    ids = document_ids(tokens, EOS)
    q, k = (torch.randn(2, 8, 512, 96, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    v = torch.randn(2, 8, 512, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(2, 8, 512, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    results = []
    for kernel in ("flash", "sdpa"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = document_attention(*leaves, DocumentLayout(ids, kernel), 96 ** -0.5)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for flash, sdpa in zip(*results):
        torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)

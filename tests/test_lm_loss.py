"""The chunked LM head + cross-entropy (train.loss_chunk_tokens): equal to the full-logits loss in
value and gradients, and its peak memory lower by what the planner predicts."""

from __future__ import annotations

import pytest
import torch

from mythos_scale.config import ModelConfig
from mythos_scale.plan.alloc_tracker import PeakTracker
from mythos_scale.plan.layout import Runtime
from mythos_scale.plan.memory import loss_peak_bytes
from mythos_scale.train.lm_loss import IGNORE_INDEX, chunked_linear_cross_entropy, full_linear_cross_entropy


def problem(tokens: int = 37, dim: int = 16, vocab: int = 101, ignored: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.randperm(tokens, generator=gen)[:ignored]] = IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, **kw):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, labels, **kw)
    (out.total * 0.7).backward()  # a non-unit upstream gradient
    return out, hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 13, 36, 50])
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_chunked_equals_full_loss_and_gradients(chunk, z_loss_coef):
    hidden, weight, labels = problem()
    full = loss_and_grads(full_linear_cross_entropy, hidden, weight, labels, z_loss_coef=z_loss_coef)
    chunked = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, labels, chunk=chunk,
                             z_loss_coef=z_loss_coef)
    for name in ("total", "lm", "z"):
        torch.testing.assert_close(getattr(chunked[0], name), getattr(full[0], name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], full[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[2], full[2], rtol=1e-6, atol=1e-6)
    assert chunked[1][labels == IGNORE_INDEX].abs().max() == 0  # ignored tokens get no gradient


def test_ignored_tokens_change_nothing_adversarial():
    """Changing an ignored token's hidden state leaves loss and weight gradient bitwise alike;
    changing a kept one does not (the check can fail)."""
    hidden, weight, labels = problem()
    base = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, labels, chunk=8)
    ignored, kept = (labels == IGNORE_INDEX).nonzero()[0, 0], (labels != IGNORE_INDEX).nonzero()[0, 0]
    for row, same in ((ignored, True), (kept, False)):
        moved = hidden.detach().clone()
        moved[row] += 1.0
        other = loss_and_grads(chunked_linear_cross_entropy, moved.requires_grad_(), weight, labels, chunk=8)
        assert torch.equal(other[0].total, base[0].total) == same
        assert torch.equal(other[2], base[2]) == same


def test_chunked_peak_memory_is_lower_by_the_predicted_amount():
    """Dispatcher-level peak of loss forward + backward, full vs chunked, fp32 with the z-loss: each
    within 5% of the planner's loss_peak_bytes, so the saving is the predicted one."""
    tokens, dim, vocab, chunk = 1024, 64, 4096, 128
    cfg = ModelConfig(vocab_size=vocab, dim=dim)
    hidden, weight, labels = problem(tokens, dim, vocab, ignored=0)
    measured, predicted = {}, {}
    for name, fn, kw in (("full", full_linear_cross_entropy, {}),
                         ("chunked", chunked_linear_cross_entropy, {"chunk": chunk})):
        hidden.grad = weight.grad = None
        with PeakTracker() as tracker:
            fn(hidden, weight, labels, z_loss_coef=1e-4, **kw).total.backward()
        measured[name] = tracker.peak
        rt = Runtime(device="cpu", compute_bytes=4, fused_kernels=False, z_loss=True, reduce_bucket_size=1,
                     multi_rank_bucket_allreduce=False, overlap_comm=False, loss_chunk_tokens=kw.get("chunk", 0))
        predicted[name] = loss_peak_bytes(cfg, rt, tokens)
    for name in measured:
        assert measured[name] == pytest.approx(predicted[name], rel=0.05), name
    saving = measured["full"] - measured["chunked"]
    assert saving == pytest.approx(predicted["full"] - predicted["chunked"], rel=0.02)
    assert measured["chunked"] < measured["full"] / 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (launch/gpu_check.sh runs it on one)")
def test_liger_matches_chunked_on_cuda():
    """liger-kernel's fused linear cross-entropy against the chunked path, bf16 at the 770M vocab,
    with ignore-index tokens and the z-loss.  Fails, not skips, on a GPU without liger-kernel."""
    from mythos_scale.train.lm_loss import liger_available, liger_linear_cross_entropy
    assert liger_available(), "liger-kernel is not installed"
    hidden, weight, labels = problem(tokens=4096, dim=1536, vocab=32768, ignored=100)
    hidden, weight = (t.detach().cuda().bfloat16().requires_grad_() for t in (hidden, weight))
    weight.data.mul_(0.02)
    labels = labels.cuda()
    fused = loss_and_grads(liger_linear_cross_entropy, hidden, weight, labels, z_loss_coef=1e-4)
    chunked = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, labels, chunk=1024, z_loss_coef=1e-4)
    torch.testing.assert_close(fused[0].total, chunked[0].total, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused[0].z, chunked[0].z, rtol=1e-2, atol=1e-5)
    for a, b in ((fused[1], chunked[1]), (fused[2], chunked[2])):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-4)

"""The LM head + cross-entropy (+ z-loss) without the full fp32 logits (``train.loss_chunk_tokens``).

The plain path (``full_linear_cross_entropy``, ``loss_chunk_tokens = 0``) materializes the
(tokens x vocab) logits in the compute dtype, an fp32 copy for the log-softmax, and in the
backward an fp32 gradient of the same size: at the 770M vocabulary that is most of the step's
peak memory.  :class:`ChunkedLinearCrossEntropy` runs the head over ``chunk`` tokens at a time and
computes each chunk's gradients (hidden and head weight) right in the forward, as liger-kernel's
fused linear cross-entropy does: a chunk's logits live only while it is processed, so the loss
holds ``chunk x vocab`` floats instead of ``tokens x vocab``, and the backward only scales the
stored gradients (no recompute).  The stored gradients are the size of the hidden states and of
the head weight (fp32).

On CUDA with liger-kernel installed (the ``gpu`` extra), its Triton kernel does the same fused
(``train.loss_kernel`` = auto); the semantics are identical: mean cross-entropy over the tokens
whose label is not ``ignore_index``, z-loss ``coef * mean(logsumexp^2)`` over the same tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mythos_scale.data.manifest import IGNORE_INDEX

log = logging.getLogger(__name__)



class LMLoss(NamedTuple):
    """``total = lm + z`` (differentiable) and its detached parts for logging."""

    total: torch.Tensor
    lm: torch.Tensor
    z: torch.Tensor


def full_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              z_loss_coef: float = 0.0, ignore_index: int = IGNORE_INDEX) -> LMLoss:
    """The reference: full logits, fp32 log-softmax.  ``hidden`` (..., D), ``labels`` (...)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight).float()
    labels = labels.reshape(-1)
    lm = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    if not z_loss_coef:
        return LMLoss(lm, lm.detach(), lm.new_zeros(()))
    valid = labels != ignore_index
    z = z_loss_coef * (torch.logsumexp(logits, dim=-1).pow(2) * valid).sum() / valid.sum().clamp_min(1)
    return LMLoss(lm + z, lm.detach(), z.detach())


def _chunk(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, count: torch.Tensor,
           z_loss_coef: float, grad_x: torch.Tensor | None, grad_weight: torch.Tensor | None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and lse^2 over its kept rows; writes the chunk's part of
    the gradients of ``(sum ce + coef * sum lse^2) / count`` into ``grad_x`` and adds it to
    ``grad_weight``.  Its (chunk x vocab) logits die when it returns."""
    logits = F.linear(x, weight).float()
    lse = torch.logsumexp(logits, dim=-1)
    safe_target = torch.where(keep, target, 0)
    lm = ((lse - logits.gather(1, safe_target[:, None]).squeeze(1)) * keep).sum()
    z = (lse.pow(2) * keep).sum()
    if grad_x is not None or grad_weight is not None:
        # d/d logits = softmax * (1 + 2 coef lse) - onehot(target), per kept row / count: in place
        probs = logits.sub_(lse[:, None]).exp_()
        probs.mul_(((1 + 2 * z_loss_coef * lse) * keep / count)[:, None])
        probs[torch.arange(len(target), device=probs.device), safe_target] -= keep / count
        if grad_x is not None:
            grad_x.copy_(probs.to(x.dtype) @ weight)
        if grad_weight is not None:
            grad_weight.addmm_(probs.t(), x.float())
    return lm, z


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients of the summed loss; backward
    multiplies them by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                z_loss_coef: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        valid = labels != ignore_index
        count = valid.sum().clamp_min(1).float()
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        lm_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            lm_part, z_part = _chunk(hidden[rows], weight, labels[rows], valid[rows], count, z_loss_coef,
                                     None if grad_hidden is None else grad_hidden[rows], grad_weight)
            lm_sum += lm_part
            z_sum += z_part
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        lm, z = lm_sum / count, z_loss_coef * z_sum / count
        ctx.mark_non_differentiable(lm, z)
        return lm + z, lm, z

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_lm, _grad_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                                 z_loss_coef: float = 0.0, ignore_index: int = IGNORE_INDEX) -> LMLoss:
    """:func:`full_linear_cross_entropy`'s values and gradients, holding ``chunk`` tokens' logits at a time."""
    total, lm, z = ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                   labels.reshape(-1), chunk, z_loss_coef, ignore_index)
    return LMLoss(total, lm, z)


@functools.cache
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               z_loss_coef: float = 0.0, ignore_index: int = IGNORE_INDEX) -> LMLoss:
    """liger-kernel's fused Triton kernel (CUDA), same semantics as the chunked path."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    result = liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                              ignore_index=ignore_index, lse_square_scale=z_loss_coef,
                                              return_z_loss=True)
    total, z = result[0], result[1]  # (loss incl. z-loss, z-loss); later versions may append more
    z = z if z is not None else total.new_zeros(())
    return LMLoss(total, (total - z).detach(), z.detach())


@functools.cache
def resolve_loss_kernel(device_type: str) -> str:
    """``liger`` on CUDA when liger-kernel is installed, else ``chunked``; logged once per device."""
    kernel = "liger" if device_type == "cuda" and liger_available() else "chunked"
    log.info("LM loss on %s: %s linear cross-entropy (never the full fp32 logits)", device_type, kernel)
    return kernel


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                 z_loss_coef: float = 0.0) -> LMLoss:
    """The training loss of the LM head: full logits when ``chunk_tokens`` is 0, else chunked (or
    liger-kernel's fused kernel on CUDA)."""
    if chunk_tokens <= 0:
        return full_linear_cross_entropy(hidden, weight, labels, z_loss_coef)
    if resolve_loss_kernel(hidden.device.type) == "liger":
        return liger_linear_cross_entropy(hidden, weight, labels, z_loss_coef)
    return chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens, z_loss_coef)

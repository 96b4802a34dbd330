"""Pure-PyTorch references of the fused ops: the definition each kernel must match.

Shapes: ``...`` is any leading batch shape (usually ``(batch, seq)``), ``D`` the model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inject_rmsnorm(h: torch.Tensor, e_inj: torch.Tensor, a_bar: torch.Tensor, loop_emb: torch.Tensor,
                   weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LTI injection, then the first core block's pre-norm of it.  Returns ``(z, rmsnorm(z) * weight)``
    with ``z = a_bar * h + e_inj + loop_emb``.

    h, e_inj: (..., D); a_bar, loop_emb, weight: (D,).  ``e_inj = B_bar e`` is computed once
    per forward and reused by every loop iteration.  ``z`` is the residual stream the core block
    adds to (the state stays linear in h: no norm on z itself); the normalized copy is the block's
    attention input.
    """
    z = a_bar * h + e_inj + loop_emb
    return z, F.rms_norm(z, (z.shape[-1],), weight, eps)


def act_step(p: torch.Tensor, cum: torch.Tensor, acc: torch.Tensor, h: torch.Tensor,
             threshold: float, is_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ACT step.  Returns ``(w, new_cum, new_acc)``.

    p: halting probability of this step (...,); cum: sum of earlier weights (...,), equal to
    1 once a position has halted; acc: weighted state so far (..., D); h: this step's state.
    A running position halts when ``cum + p >= threshold`` (or on the last step) and then
    takes the remainder ``1 - cum`` as its weight, so the weights of a position sum to 1.
    """
    running = cum < 1.0
    halts = (cum + p >= threshold) | is_last
    w = torch.where(running, torch.where(halts, 1.0 - cum, p), torch.zeros_like(p))
    return w, cum + w, acc + w.unsqueeze(-1) * h


def moe_permute(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Copy each token to its ``k`` expert-sorted rows: ``out[rows[t, j]] = x[t]``.

    x: (N, D); rows: (N, k), a permutation of ``[0, N*k)`` (row ``rows[t, j]`` of the sorted
    list holds token t's j-th expert).  Returns (N*k, D).  Every output row is written exactly
    once, so the result (and the backward, a gather and a sum over k) is deterministic.
    """
    num_tokens, top_k = rows.shape
    src = x.unsqueeze(1).expand(num_tokens, top_k, x.shape[-1]).reshape(num_tokens * top_k, x.shape[-1])
    return src.new_empty(src.shape).index_copy_(0, rows.reshape(-1).long(), src)


def moe_unpermute(y: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Combine each token's ``k`` expert outputs: ``out[t] = sum_j gate[t, j] * y[rows[t, j]]``.

    y: (N*k, D) expert-sorted rows; rows: (N, k) as for :func:`moe_permute`; gate: (N, k) or
    None (weights of 1).  Returns (N, D).  A gather into (N, k, D) and a sum over k in a fixed
    order: no scatter-add, so a recompute (activation checkpointing) reproduces it bitwise.
    """
    num_tokens, top_k = rows.shape
    picked = y.index_select(0, rows.reshape(-1)).view(num_tokens, top_k, y.shape[-1])
    if gate is not None:
        picked = picked * gate.unsqueeze(-1).to(y.dtype)
    return picked.sum(dim=1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half (NeoX) convention.

    x: (B, S, H, R) with R even; cos, sin: (S, R/2).  Returns x rotated, same shape.
    """
    x1, x2 = x.chunk(2, dim=-1)
    c = cos[None, :, None, :].to(x.dtype)
    s = sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

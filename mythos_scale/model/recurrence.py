"""The pieces of the loop itself: LTI injection, the loop-index embedding, the ACT halting unit."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import ops
from mythos_scale.model.layers import sinusoidal


class LTIInjection(nn.Module):
    """Parcae's stable injection ``z = A_bar * h + B_bar e``, zero-order-hold discretized.

    ``A = -exp(A_log)`` (diagonal), ``dt = softplus(dt_bias)``, ``A_bar = exp(dt * A)`` clamped to
    ``[a_bar_min, a_bar_max]`` (a_bar_max < 1 is representable below 1.0 in bf16, so
    rho(A_bar) < 1 holds in the compute dtype too), ``B_bar = dt * B`` with ``B`` identity-init.
    All of it is computed in fp32 whatever the parameters' storage dtype.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inj = cfg.injection
        self.a_bar_min, self.a_bar_max = inj.a_bar_min, inj.a_bar_max
        self.a_log = nn.Parameter(torch.full((cfg.dim,), inj.a_log_init))
        dt_bias = inj.dt_init + math.log(-math.expm1(-inj.dt_init))  # inverse softplus
        self.dt_bias = nn.Parameter(torch.full((cfg.dim,), dt_bias))
        self.b = nn.Parameter(torch.eye(cfg.dim))

    def a_bar(self) -> torch.Tensor:
        dt = F.softplus(self.dt_bias.float())
        return torch.exp(-dt * torch.exp(self.a_log.float())).clamp(self.a_bar_min, self.a_bar_max)

    def inject(self, e: torch.Tensor) -> torch.Tensor:
        """``B_bar e`` in fp32, shape of ``e``; computed once per forward, reused by every iteration."""
        dt = F.softplus(self.dt_bias.float())
        return F.linear(e.float(), self.b.float()) * dt


class LoopEmbedding(nn.Module):
    """Which iteration the shared core is in.

    ``sinusoidal``: the fixed encoding of t times a learned per-channel gain; extrapolates past
    max_loops.  ``learned``: a (max_loops, D) table; iterations past max_loops reuse the last row.
    Both start at scale ``init_std / 10``: the same vector is added to every token, so at the
    scale of the injected input (~init_std) it would make all positions look alike.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind, self.dim = cfg.loop_embedding, cfg.dim
        if self.kind == "sinusoidal":
            self.gain = nn.Parameter(torch.full((cfg.dim,), cfg.init_std / 10))
        else:
            self.table = nn.Parameter(torch.empty(cfg.max_loops, cfg.dim))

    def forward(self, loop: int) -> torch.Tensor:
        if self.kind == "sinusoidal":
            return sinusoidal(loop, self.dim, self.gain.device) * self.gain.float()
        row = torch.tensor([min(loop, self.table.shape[0] - 1)], device=self.table.device)
        return F.embedding(row, self.table)[0]


class HaltingUnit(nn.Module):
    """ACT halting probability ``p = sigmoid(w . h + b)`` per position (fp32)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h).float().squeeze(-1))


class ACTAccumulator:
    """Running ACT state of one forward: weights ``w_t`` (summing to 1 per position), the
    weighted output ``sum_t w_t h_{t+1}`` (fp32), and Graves' ponder terms: N (iterations a
    position ran, a constant) and the remainder R (the halting step's weight ``1 - sum of earlier
    p``, which carries the gradient)."""

    def __init__(self, like: torch.Tensor, threshold: float) -> None:
        self.threshold = threshold
        self.cum = like.new_zeros(like.shape[:-1], dtype=torch.float32)
        self.acc = like.new_zeros(like.shape, dtype=torch.float32)
        self.steps = torch.zeros_like(self.cum)
        self.remainder = torch.zeros_like(self.cum)

    def step(self, p: torch.Tensor, h: torch.Tensor, is_last: bool) -> None:
        running = self.cum < 1.0
        halts = running & ((self.cum + p >= self.threshold) | is_last)
        w, self.cum, self.acc = ops().act_step(p, self.cum, self.acc, h.float(), self.threshold, is_last)
        self.steps = self.steps + running.float()
        self.remainder = self.remainder + torch.where(halts, w, torch.zeros_like(w))

    def ponder(self) -> torch.Tensor:
        """Mean over positions of N + R."""
        return (self.steps + self.remainder).mean()

"""Small building blocks: RMSNorm, a linear layer with depth-wise LoRA, the SwiGLU FFN, RoPE tables."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mythos_scale.kernels import KernelDispatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LoopLinear(nn.Module):
    """A bias-free linear layer with optional depth-wise LoRA (Relaxed Recursive Transformers).

    With ``max_loops > 0`` and ``rank > 0`` it holds one rank-r adapter per loop iteration:
    ``W_t = W + B_t A_t``.  ``B_t`` starts at zero so training starts as pure weight tying.
    ``loop`` beyond the last adapter uses the last one (clamped); ``loop=None`` (prelude,
    coda) uses ``W`` alone.
    """

    def __init__(self, in_features: int, out_features: int, max_loops: int = 0, rank: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        if max_loops > 0 and rank > 0:
            self.lora_a = nn.Parameter(torch.empty(max_loops, rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(max_loops, out_features, rank))

    def adapter(self, loop: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A_t, B_t)`` for iteration ``loop``, or None (no adapters, or outside the core)."""
        if self.lora_a is None or loop is None:
            return None
        t = min(loop, self.lora_a.shape[0] - 1)
        return self.lora_a[t], self.lora_b[t]

    def forward(self, x: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        lora = self.adapter(loop)
        if lora is not None:
            y = y + F.linear(F.linear(x, lora[0]), lora[1])
        return y


class DenseFFN(nn.Module):
    """SwiGLU feed-forward: ``w_down(silu(w_gate x) * w_up x)``."""

    def __init__(self, dim: int, hidden: int, kernels: KernelDispatch) -> None:
        super().__init__()
        self.kernels = kernels
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.w_down.is_output_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.kernels.swiglu(self.w_gate(x), self.w_up(x)))


class RotaryTable(nn.Module):
    """cos/sin tables for rotate-half RoPE, fp32, ``max_seq_len`` positions."""

    def __init__(self, rope_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.rope_dim, self.theta = rope_dim, theta
        self.register_buffer("cos", torch.empty(max_seq_len, rope_dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, rope_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Compute the tables in place on their device (again after ``to_empty``: they are not saved)."""
        device = self.cos.device
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.rope_dim, 2, dtype=torch.float32, device=device)
                                        / self.rope_dim)
        angles = torch.outer(torch.arange(self.cos.shape[0], dtype=torch.float32, device=device), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if end > self.cos.shape[0]:
            raise ValueError(f"position {end - 1} is beyond model.max_seq_len ({self.cos.shape[0]})")
        return self.cos[start:end], self.sin[start:end]


def sinusoidal(position: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The transformer sinusoidal encoding of one integer position, shape (dim,), fp32."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / half)
    angle = position * freq
    out = torch.cat((angle.sin(), angle.cos()))
    return F.pad(out, (0, dim - 2 * half))

"""The pieces of the loop itself: LTI injection, the loop-index embedding, the ACT halting unit."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import KernelDispatch
from mythos_scale.model.layers import sinusoidal


class LTIInjection(nn.Module):
    """Parcae's stable injection ``z = A_bar * h + B_bar e``, zero-order-hold discretized.

    ``dt = softplus(dt_bias)``, ``B_bar = dt * B`` (``B`` identity-init), and the diagonal
    ``A_bar = a_min + (a_max - a_min) * exp(-dt * exp(A_log))``: ZOH's ``exp(dt * A)`` with
    ``A = -exp(A_log)``, mapped smoothly into ``(a_bar_min, a_bar_max)``.  A hard clamp would cut
    the gradient of A_log wherever it binds; this bound keeps it (it only fades like the
    exponential itself) and holds in every dtype, since a_bar_max rounds below 1.0 even in bf16
    (checked by the config).  So rho(A_bar) < 1: with the core's update bounded (its blocks
    normalize their own inputs), the state stays bounded over any number of loops.

    A_log, dt_bias and B stay float32 when the module is cast (``model.bfloat16()``): they set the
    recurrence's decay, where bf16's 3 significant digits would be felt over many loops.
    Everything here is computed in float32.  Under a bf16 DeepSpeed engine the parameters are
    stored in bf16 (DeepSpeed casts them itself); A_log and dt_bias are then computed from their
    fp32 master values, ``fp32_values``, set after each step (mythos_scale/parallel/precision.py).
    """

    FP32_VALUES = ("a_log", "dt_bias")  # computed from fp32 masters under a bf16 engine

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inj = cfg.injection
        self.a_bar_min, self.a_bar_max = inj.a_bar_min, inj.a_bar_max
        fp32 = dict(dtype=torch.float32)  # whatever the default dtype the model is built under
        self.a_log = nn.Parameter(torch.full((cfg.dim,), inj.a_log_init, **fp32))
        self.dt_bias = nn.Parameter(torch.full((cfg.dim,), self.dt_bias_for(inj.dt_init), **fp32))
        self.b = nn.Parameter(torch.eye(cfg.dim, **fp32))
        self.fp32_values: dict[str, torch.Tensor] = {}  # name -> fp32 master value (bf16 engines only)

    @staticmethod
    def dt_bias_for(dt: float) -> float:
        """The dt_bias giving ``softplus(dt_bias) = dt`` (inverse softplus)."""
        return dt + math.log(-math.expm1(-dt))

    def _fp32(self, name: str) -> torch.Tensor:
        """The parameter's value in fp32: its fp32 master where one is set (the same value exactly,
        the gradient going to the stored parameter), else the parameter itself cast up."""
        param = getattr(self, name)
        master = self.fp32_values.get(name)
        if master is None:
            return param.float()
        return master.to(param.device) + (param - param.detach()).float()

    def a_bar(self) -> torch.Tensor:
        dt = F.softplus(self._fp32("dt_bias"))
        decay = torch.exp(-dt * torch.exp(self._fp32("a_log")))
        return self.a_bar_min + (self.a_bar_max - self.a_bar_min) * decay

    def inject(self, e: torch.Tensor) -> torch.Tensor:
        """``B_bar e`` in fp32, shape of ``e``; computed once per forward, reused by every iteration."""
        dt = F.softplus(self._fp32("dt_bias"))
        return F.linear(e.float(), self.b.float()) * dt

    def _apply(self, fn, recurse=True):
        kept = {name: p.data for name, p in self.named_parameters(recurse=False)}
        super()._apply(fn, recurse)
        for name, p in self.named_parameters(recurse=False):
            if p.dtype != torch.float32:  # a dtype cast: keep the float32 values, on the new device
                p.data = p.data.float() if kept[name].is_meta else kept[name].to(p.device)
        return self


class LoopEmbedding(nn.Module):
    """Which iteration the shared core is in.

    ``sinusoidal``: the fixed encoding of t times a learned per-channel gain; extrapolates past
    max_loops.  ``learned``: a (max_loops, D) table; iterations past max_loops reuse the last row.
    Both start at scale ``loop_embedding_init`` (default ``init_std / 10``): the same vector is
    added to every token, so a large one would make all positions look alike.  ``none``: zero, no
    parameter; the core cannot tell iterations apart (Huginn's recurrence).
    """

    @staticmethod
    def init_scale(cfg: ModelConfig) -> float:
        return cfg.init_std / 10 if cfg.loop_embedding_init is None else cfg.loop_embedding_init

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind, self.dim = cfg.loop_embedding, cfg.dim
        if self.kind == "sinusoidal":
            self.gain = nn.Parameter(torch.full((cfg.dim,), self.init_scale(cfg)))
        elif self.kind == "learned":
            self.table = nn.Parameter(torch.empty(cfg.max_loops, cfg.dim))
        else:  # a buffer, so the zero vector follows the model's device
            self.register_buffer("zero", torch.zeros(cfg.dim), persistent=False)

    def forward(self, loop: int) -> torch.Tensor:
        if self.kind == "none":
            return self.zero
        if self.kind == "sinusoidal":
            return sinusoidal(loop, self.dim, self.gain.device) * self.gain.float()
        # A row by a Python int: no index tensor built on the host (no sync).  Copied, not a view: a
        # view made under no_grad (the truncated iterations) would still say requires_grad without
        # a grad_fn, which module hooks (FlopCounterMode's tracker) cannot handle.
        return self.table[min(loop, self.table.shape[0] - 1)].clone()


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
    position ran in the window, a constant) and the remainder R (the halting step's weight
    ``1 - sum of earlier p``, which carries the gradient)."""

    def __init__(self, like: torch.Tensor, threshold: float, kernels: KernelDispatch) -> None:
        self.threshold, self.kernels = threshold, kernels
        self.cum = like.new_zeros(like.shape[:-1], dtype=torch.float32)
        self.acc = like.new_zeros(like.shape, dtype=torch.float32)
        self.steps = torch.zeros_like(self.cum)
        self.remainder = torch.zeros_like(self.cum)

    def step(self, p: torch.Tensor, h: torch.Tensor, is_last: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Take one step with halting probabilities ``p`` for states ``h``; ``rows`` (inference)
        restricts it to those batch rows (the others have all halted).  Returns the positions
        (of ``p``'s shape) that halt at this step."""
        cum, acc = (self.cum, self.acc) if rows is None else (self.cum[rows], self.acc[rows])
        running = cum < 1.0
        halts = running & ((cum + p >= self.threshold) | is_last)
        w, cum, acc = self.kernels.act_step(p, cum, acc, h.float(), self.threshold, is_last)
        steps = running.float()
        remainder = torch.where(halts, w, torch.zeros_like(w))
        if rows is None:
            self.cum, self.acc = cum, acc
            self.steps = self.steps + steps
            self.remainder = self.remainder + remainder
        else:
            self.cum[rows], self.acc[rows] = cum, acc
            self.steps[rows] += steps
            self.remainder[rows] += remainder
        return halts

    def ponder(self) -> torch.Tensor:
        """Mean over positions of N + R."""
        return (self.steps + self.remainder).mean()


def kl_divergence(logp: torch.Tensor, prev_logp: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per position from log-probabilities ``logp`` of p and ``prev_logp`` of q (..., V);
    clamped at 0 (rounding can make a KL of two nearly equal distributions slightly negative)."""
    return (logp.exp() * (logp - prev_logp)).sum(-1).clamp_min(0.0)


class FrozenKV:
    """The attention cache of one core layer at one loop iteration of an early-exit forward.

    Positions that have exited (``frozen``, (b, s)) compute nothing that is kept: the keys and
    values they offer the others are the ones of their last computed iteration (``last``, as
    Huginn's generation shares KV entries across steps).  ``update`` is what the attention calls
    (the :class:`~mythos_scale.model.cache.LayerCache` interface): it merges the new entries with
    ``last``, keeps the merged ones in ``self.new`` for the next iteration, and passes them on to
    ``store`` (a KV-cache layer, for the batch ``rows`` computed) when decoding with a cache.
    """

    def __init__(self, frozen: torch.Tensor, last: list[torch.Tensor] | None, store=None,
                 rows: torch.Tensor | None = None) -> None:
        self.frozen, self.last, self.store, self.rows = frozen, last, store, rows
        self.new: list[torch.Tensor] = []

    def update(self, start_pos: int, *new: torch.Tensor) -> list[torch.Tensor]:
        if self.last is not None:
            new = tuple(torch.where(self.frozen.view(*self.frozen.shape, *[1] * (n.ndim - 2)), old, n)
                        for old, n in zip(self.last, new))
        self.new = list(new)
        if self.store is None:
            return self.new
        return self.store.update(start_pos, *new, rows=self.rows)

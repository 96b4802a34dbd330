"""DeepSeekMoE: fine-grained routed SwiGLU experts (top-k, dropless) plus always-on shared experts.

Routing (DeepSeek-V3): ``score = sigmoid|softmax(router(x) + depth_bias[t])``; experts are
*selected* on ``score + balance_bias[t]`` while the *gates* use the unbiased scores
(normalized over the chosen k for sigmoid, times ``route_scale``).  ``depth_bias`` is a learned
(max_loops, E) term so each loop iteration can route differently; ``balance_bias`` is a
persistent (max_loops, E) fp32 buffer moved by :func:`update_balance_bias` from the int64 token
counts per (depth, expert) in ``expert_counts``.  Depths beyond ``max_loops`` use the last row.
Without depth routing both buffers have one row, shared by every iteration.
Both stay in their dtypes when the module is cast (``model.bfloat16()``): bf16 could neither
count tokens exactly nor hold a bias that moves by 1e-3 steps.

Dispatch, all on the device with no host sync and no data-dependent shape: the N*k
(token, slot) pairs are sorted by expert, ``rows[t, j]`` is the sorted row of token t's j-th
expert and ``group_end[e]`` the end of expert e's rows (int32, the offsets of a grouped GEMM).
``kernels.moe_permute`` copies tokens to their sorted rows, the routed experts run as one
grouped GEMM per projection (``torch.nn.functional.grouped_mm``), and ``kernels.moe_unpermute``
gathers each token's k outputs and sums them gate-weighted in a fixed order.  Nothing is
scatter-added, so the combine is deterministic on every device: an activation-checkpointing
recompute reproduces the forward bitwise, and near-tie routing decisions downstream cannot flip.
No token is ever dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import KernelDispatch, select_kernels
from mythos_scale.model.layers import DenseFFN, LoopLinear
from mythos_scale.model.recompute import host_values


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs ``x @ weight[e].T`` for these operands: fp32,
    bf16 or fp16 on CPU; bf16 with 16-byte aligned rows on CUDA (CUTLASS on sm90+, torch's
    own loop elsewhere) and on meta (its shape function mirrors the CUDA checks, so a meta
    trace, and a torch.compile trace on any device, takes the GPU path).  It has no fp32 CUDA
    kernel and no fp64 at all."""
    if x.dtype != weight.dtype:
        return False
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return (x.device.type in ("cuda", "meta", "cpu") and x.dtype == torch.bfloat16
            and x.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run on expert-sorted rows as grouped GEMMs."""

    def __init__(self, n_experts: int, dim: int, hidden: int, kernels: KernelDispatch) -> None:
        super().__init__()
        self.kernels = kernels
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w_down.is_output_projection = True

    def forward(self, x_sorted: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
        """x_sorted: (M, D) rows grouped by expert; group_end: (E,) int32, expert e owns rows
        ``group_end[e-1]:group_end[e]``.  Returns (M, D)."""
        if not grouped_mm_supported(x_sorted, self.w_gate):
            return self.per_expert_loop(x_sorted, group_end)

        def gmm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return F.grouped_mm(rows, weight.transpose(-2, -1), offs=group_end)

        return gmm(self.kernels.swiglu(gmm(x_sorted, self.w_gate), gmm(x_sorted, self.w_up)), self.w_down)

    def per_expert_loop(self, x_sorted: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
        """The same experts as a loop of ``F.linear``, for operands grouped_mm lacks (fp32 or
        fp64 on CUDA, fp64 on CPU).  Splitting the rows needs the group sizes on the host (one
        sync per call; an activation-checkpoint recompute replays the forward's) and gives
        data-dependent shapes.  ``unbind`` gives each expert its weight views with one stacked
        gradient, not a zero-filled full-size gradient per expert."""
        sizes = host_values("expert_rows", torch.diff(group_end, prepend=group_end.new_zeros(1)).tolist)
        weights = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        return torch.cat([F.linear(self.kernels.swiglu(F.linear(rows, gate), F.linear(rows, up)), down)
                          for rows, (gate, up, down) in zip(x_sorted.split(sizes), weights)])


class MoE(nn.Module):
    """Routed + shared experts.  ``forward`` returns ``(y, aux_loss, counts)``; counts are the
    tokens each expert received, (E,) int64, so the caller can accumulate them per depth."""

    def __init__(self, cfg: ModelConfig, kernels: KernelDispatch | None = None) -> None:
        super().__init__()
        kernels = kernels or select_kernels(cfg.kernels)
        m = cfg.moe
        self.n_experts, self.top_k = m.n_routed_experts, m.top_k
        self.score_func, self.route_scale = m.score_func, m.route_scale
        self.aux_loss_coef = m.aux_loss_coef
        router_loops = cfg.max_loops if "router" in cfg.lora_targets else 0
        self.router = LoopLinear(cfg.dim, self.n_experts, router_loops, cfg.lora_rank)
        self.depth_bias = nn.Parameter(torch.zeros(cfg.max_loops, self.n_experts)) if m.depth_routing else None
        depths = cfg.max_loops if m.depth_routing else 1  # rows of the balancing bias and the load counts
        self.register_buffer("balance_bias", torch.zeros(depths, self.n_experts, dtype=torch.float32))
        self.register_buffer("expert_counts", torch.zeros(depths, self.n_experts, dtype=torch.long),
                             persistent=False)
        self.experts = RoutedExperts(self.n_experts, cfg.dim, m.expert_hidden, kernels)
        shared_hidden = m.n_shared_experts * m.expert_hidden
        self.shared = DenseFFN(cfg.dim, shared_hidden, kernels) if m.n_shared_experts > 0 else None

    def depth_row(self, loop: int) -> int:
        """The row of ``depth_bias`` / ``balance_bias`` / ``expert_counts`` iteration ``loop`` uses:
        its own up to max_loops, then the last; always 0 without depth routing."""
        return min(loop, self.balance_bias.shape[0] - 1)

    def route(self, x: torch.Tensor, loop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D).  Returns (scores (N, E) fp32, chosen experts (N, k), gates (N, k) fp32)."""
        depth = self.depth_row(loop)
        logits = self.router(x, loop).float()
        if self.depth_bias is not None:
            logits = logits + self.depth_bias[depth].float()
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        chosen = (scores.detach() + self.balance_bias[depth]).topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.score_func == "sigmoid":
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return scores, chosen, gates * self.route_scale

    def dispatch_plan(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For chosen experts (N, k): ``rows`` (N, k), the expert-sorted row of each (token, slot)
        pair, a permutation of [0, N*k); ``group_end`` (E,) int32, the end of each expert's rows."""
        experts = chosen.flatten()
        sorted_experts, order = experts.sort(stable=True)
        rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        bounds = torch.arange(1, self.n_experts + 1, device=chosen.device, dtype=sorted_experts.dtype)
        return rows.view_as(chosen), torch.searchsorted(sorted_experts, bounds, out_int32=True)

    def forward(self, x: torch.Tensor, loop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        scores, chosen, gates = self.route(flat, loop)
        rows, group_end = self.dispatch_plan(chosen)
        y_sorted = self.experts(self.experts.kernels.moe_permute(flat, rows), group_end)
        y = self.experts.kernels.moe_unpermute(y_sorted, rows, gates)
        if self.shared is not None:
            y = y + self.shared(flat)
        aux = self._sequence_aux_loss(scores, chosen, bsz, seq) if self.aux_loss_coef > 0 else scores.new_zeros(())
        counts = torch.diff(group_end, prepend=group_end.new_zeros(1)).long()
        return y.view(bsz, seq, dim).to(x.dtype), aux, counts

    def _apply(self, fn, recurse=True):
        """Keep ``balance_bias`` fp32 through dtype casts (``.bfloat16()``, ``.to(dtype)``): the
        cast result is replaced by the fp32 values moved to its device.  Casts that keep the
        dtype (``.to(device)``, ``to_empty``, meta -> device) apply as usual."""
        bias = self.balance_bias
        super()._apply(fn, recurse)
        if self.balance_bias.dtype != bias.dtype:
            self.balance_bias = bias.to(device=self.balance_bias.device)
        return self

    def _sequence_aux_loss(self, scores: torch.Tensor, chosen: torch.Tensor, bsz: int, seq: int) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss ``coef * sum_i f_i P_i``, averaged over sequences."""
        probs = scores / scores.sum(dim=-1, keepdim=True)
        probs = probs.view(bsz, seq, self.n_experts).mean(dim=1)
        hits = F.one_hot(chosen.view(bsz, seq * self.top_k), self.n_experts).sum(dim=1).float()
        load = hits * self.n_experts / (self.top_k * seq)
        return self.aux_loss_coef * (load * probs).sum(dim=-1).mean()


@torch.no_grad()
def update_balance_bias(model: nn.Module, rate: float,
                        all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
    """DeepSeek-V3 auxiliary-loss-free balancing step for every MoE layer of ``model``.

    Stacks the token counts of all layers (L, max_loops, E) int64, applies ``all_reduce`` to that
    tensor in place (e.g. a sum over the data-parallel group), then for each layer and each
    depth that saw tokens moves ``balance_bias`` by ``-rate`` for over-loaded experts and
    ``+rate`` for under-loaded ones, and resets the counts.  Returns, per depth that saw tokens,
    the highest max/mean expert load over layers (``moe/load_max_over_mean/depth_t``) and
    overall (``moe/load_max_over_mean``).
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        return {}
    counts = torch.stack([m.expert_counts for m in layers])
    if all_reduce is not None:
        all_reduce(counts)
    counts = counts.float()
    mean = counts.mean(dim=-1, keepdim=True)
    seen = mean > 0
    for layer, layer_counts, layer_mean, layer_seen in zip(layers, counts, mean, seen):
        step = torch.sign(layer_mean - layer_counts) * rate * layer_seen
        layer.balance_bias.add_(step.to(layer.balance_bias.dtype))
        layer.expert_counts.zero_()
    ratio = torch.where(seen, counts.max(dim=-1, keepdim=True).values / mean.clamp_min(1e-9), 0.0)
    per_depth = ratio.squeeze(-1).amax(dim=0).tolist()  # the one host sync
    stats = {f"moe/load_max_over_mean/depth_{t}": v for t, v in enumerate(per_depth) if v > 0}
    if stats:
        stats["moe/load_max_over_mean"] = max(per_depth)
    return stats

"""DeepSeekMoE: fine-grained routed SwiGLU experts (top-k, dropless) plus always-on shared experts.

Routing (DeepSeek-V3): ``score = sigmoid|softmax(router(x) + depth_bias[t])``; experts are
*selected* on ``score + balance_bias[t]`` while the *gates* use the unbiased scores
(normalized over the chosen k for sigmoid, times ``route_scale``).  ``depth_bias`` is a learned
(max_loops, E) term so each loop iteration can route differently; ``balance_bias`` is a
persistent (max_loops, E) fp32 buffer moved by :func:`update_balance_bias` from the int64 token
counts per (depth, expert) in ``expert_counts``.  Depths beyond ``max_loops`` use the last row.
Both stay in their dtypes when the module is cast (``model.bfloat16()``): bf16 could neither
count tokens exactly nor hold a bias that moves by 1e-3 steps.

Dispatch: the (token, expert) pairs are sorted by expert (stable argsort), rows gathered with
``ops().moe_permute``, each expert runs once on its contiguous slice, and
``ops().moe_unpermute`` scatters gate-weighted outputs back.  No token is ever dropped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import ops
from mythos_scale.model.layers import DenseFFN, LoopLinear


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights; runs each on its contiguous slice of rows."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w_down.is_output_projection = True

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: (M, D) rows grouped by expert, ``counts[e]`` rows for expert e."""
        outputs = []
        for e, rows in enumerate(x_sorted.split(counts)):
            if rows.shape[0] == 0:
                continue
            hidden = ops().swiglu(F.linear(rows, self.w_gate[e]), F.linear(rows, self.w_up[e]))
            outputs.append(F.linear(hidden, self.w_down[e]))
        if not outputs:
            return x_sorted.new_zeros(0, x_sorted.shape[-1])
        return torch.cat(outputs)


class MoE(nn.Module):
    """Routed + shared experts.  ``forward`` returns ``(y, aux_loss, counts)``; counts are the
    tokens each expert received, (E,) int64, so the caller can accumulate them per depth."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        self.n_experts, self.top_k = m.n_routed_experts, m.top_k
        self.score_func, self.route_scale = m.score_func, m.route_scale
        self.aux_loss_coef = m.aux_loss_coef
        router_loops = cfg.max_loops if "router" in cfg.lora_targets else 0
        self.router = LoopLinear(cfg.dim, self.n_experts, router_loops, cfg.lora_rank)
        self.depth_bias = nn.Parameter(torch.zeros(cfg.max_loops, self.n_experts)) if m.depth_routing else None
        self.register_buffer("balance_bias", torch.zeros(cfg.max_loops, self.n_experts))
        self.register_buffer("expert_counts", torch.zeros(cfg.max_loops, self.n_experts, dtype=torch.long),
                             persistent=False)
        self.experts = RoutedExperts(self.n_experts, cfg.dim, m.expert_hidden)
        self.shared = DenseFFN(cfg.dim, m.n_shared_experts * m.expert_hidden) if m.n_shared_experts > 0 else None

    def route(self, x: torch.Tensor, loop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D).  Returns (scores (N, E) fp32, chosen experts (N, k), gates (N, k) fp32)."""
        depth = min(loop, self.balance_bias.shape[0] - 1)
        logits = self.router(x, loop).float()
        if self.depth_bias is not None:
            logits = logits + self.depth_bias[depth].float()
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        chosen = (scores.detach() + self.balance_bias[depth]).topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.score_func == "sigmoid":
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return scores, chosen, gates * self.route_scale

    def forward(self, x: torch.Tensor, loop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        scores, chosen, gates = self.route(flat, loop)
        expert_of_pair = chosen.flatten()
        order = torch.argsort(expert_of_pair, stable=True)
        token_index = order // self.top_k
        counts = torch.bincount(expert_of_pair, minlength=self.n_experts)
        x_sorted = ops().moe_permute(flat, token_index)
        y_sorted = self.experts(x_sorted, counts.tolist())
        y = ops().moe_unpermute(y_sorted, token_index, gates.flatten()[order], flat.shape[0])
        if self.shared is not None:
            y = y + self.shared(flat)
        aux = self._sequence_aux_loss(scores, chosen, bsz, seq) if self.aux_loss_coef > 0 else scores.new_zeros(())
        return y.view(bsz, seq, dim).to(x.dtype), aux, counts

    def _apply(self, fn, recurse=True):  # keep balance_bias fp32 through dtype casts
        bias = self.balance_bias
        super()._apply(fn, recurse)
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
    per_depth = ratio.squeeze(-1).amax(dim=0)
    stats = {f"moe/load_max_over_mean/depth_{t}": float(v) for t, v in enumerate(per_depth) if v > 0}
    if stats:
        stats["moe/load_max_over_mean"] = float(per_depth.max())
    return stats

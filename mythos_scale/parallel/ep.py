"""Expert parallelism: the routed experts partitioned over the EP group, dropless all-to-all dispatch.

The MoE layer itself is unchanged: it routes, sorts its (token, slot) pairs by expert once and
hands :class:`~mythos_scale.model.moe.RoutedExperts` all N*k expert-sorted rows with the end of
each expert's rows.  Under EP that module holds experts ``[ep_rank * E/ep, (ep_rank+1) * E/ep)``,
and its forward (:class:`ExpertParallelExperts`) sends each row to the rank that holds its expert:

1. counts: an all-to-all of the (E,) per-expert row counts (equal splits, on the device) tells
   each rank how many rows every source sends to each of its local experts;
2. one device->host sync reads the per-rank split sizes (``all_to_all_single`` takes them as
   Python ints: this is the one sync per MoE call under EP, on gloo and NCCL alike).  An
   activation-checkpoint recompute does neither step 1 nor this read: it replays the forward's
   counts and splits (:mod:`mythos_scale.model.recompute`; the recompute is bitwise the forward,
   and a device-side assert, which does not sync, checks its counts are the forward's);
3. tokens: one all-to-all with those uneven splits (torch's functional collectives, with
   autograd); rows arrive grouped by source, then by local expert;
4. the received rows are put in local-expert order by a permutation computed on the device from
   the counts (no second sort), the local experts run as one grouped GEMM per projection
   (``RoutedExperts.forward``), and the rows are put back in source order;
5. one all-to-all returns the outputs to their sources, in the sorted order the MoE combines.

Backward runs the same exchanges in reverse (autograd).  No token is dropped, whatever the load.
The gate weights, the combine and the balance counts stay in the MoE layer on the token's own
rank, so routing, per-depth counts and balance biases are exactly those of the single process.

Under tensor parallelism the routed experts are replicated over the TP group: each TP rank runs
its EP rank's experts on the (TP-replicated) tokens, so their compute is not divided by TP.  This
keeps one partition per expert weight (EP, along the expert dimension) and no TP collective in
the MoE; with 64+ fine-grained experts EP, not TP, is the way to split them (see the README).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

from mythos_scale.model.moe import RoutedExperts
from mythos_scale.model.recompute import host_values
from mythos_scale.parallel.distributed import ParallelLayout
from mythos_scale.parallel.shard import shard_parameter


def local_expert_order(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows come as chunks (source s, local expert e), source-major; ``counts`` (ep, El)
    holds the chunk sizes and ``total`` their sum.  Returns ``rows`` (total, 1), the local-expert-
    major position of each received row (a permutation, the ``rows`` contract of ``moe_permute``
    with k = 1), and ``group_end`` (El,) int32, the end of each local expert's rows."""
    flat = counts.flatten()
    src_start = flat.cumsum(0) - flat
    by_expert = counts.t().flatten()
    dst_start = (by_expert.cumsum(0) - by_expert).view(counts.shape[1], counts.shape[0]).t().flatten()
    chunk = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat, output_size=total)
    rows = dst_start[chunk] + torch.arange(total, device=flat.device) - src_start[chunk]
    return rows.view(-1, 1), counts.sum(0).cumsum(0).to(torch.int32)


class ExpertParallelExperts(RoutedExperts):
    """This rank's ``E / ep`` routed experts, serving the expert-sorted rows of every EP rank."""

    ep_group: dist.ProcessGroup
    num_experts: int  # E, all ranks together

    def forward(self, x_sorted: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
        """x_sorted: (M, D) this rank's rows sorted by global expert; group_end: (E,) int32.
        Returns (M, D): the experts' outputs for these rows, in the same order."""
        ep, local = dist.get_world_size(self.ep_group), self.w_gate.shape[0]
        counts = torch.diff(group_end, prepend=group_end.new_zeros(1)).long()

        def exchange_counts() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
            received = all_to_all_single(counts, None, None, self.ep_group).view(ep, local)  # [s, e]: from s to e
            splits = torch.cat((counts.view(ep, local).sum(1), received.sum(1))).tolist()  # the one host sync
            return counts, received, splits

        sent, received, splits = host_values("ep_splits", exchange_counts)  # a recompute replays the forward's
        if sent is not counts:  # a recompute: the forward's counts must be its own (checked without a sync)
            torch._assert_async((sent == counts).all(), "EP recompute routed differently from its forward")
        send, receive = splits[:ep], splits[ep:]
        total = sum(receive)
        x_in = all_to_all_single_autograd(x_sorted.contiguous(), receive, send, self.ep_group)
        rows, local_end = local_expert_order(received, total)
        y_local = super().forward(self.kernels.moe_permute(x_in, rows), local_end)
        y_in = self.kernels.moe_unpermute(y_local, rows, None)
        return all_to_all_single_autograd(y_in, send, receive, self.ep_group)


def shard_experts(model: nn.Module, rank: int, size: int, group: dist.ProcessGroup) -> None:
    """Keep EP rank ``rank``'s experts (of ``size`` ranks) of every routed-expert module and
    dispatch to the others' over ``group``.  Expert weights are (E, ...) stacks: each rank keeps a
    contiguous E/size slice."""
    for module in list(model.modules()):
        if isinstance(module, RoutedExperts):
            module.num_experts = module.w_gate.shape[0]
            for param in (module.w_gate, module.w_up, module.w_down):
                shard_parameter(param, 0, rank, size, "ep")
            module.__class__ = ExpertParallelExperts
            module.ep_group = group


def apply_ep(model: nn.Module, layout: ParallelLayout) -> None:
    """Partition the routed experts over ``layout``'s EP group (no-op for ep = 1)."""
    if layout.ep > 1:
        shard_experts(model, layout.ep_rank, layout.ep, layout.ep_group)

"""A cheap periodic check that TP-replicated parameters are still bit-identical across TP ranks.

Under tensor parallelism every parameter that is not TP-sharded (norms, the injection, the
router, experts, embeddings outside the split layers) is held whole by each TP rank, and the
ranks must keep identical copies: routing and ACT halting read them, so a copy that drifts
(a non-deterministic kernel, a rank-local update, a corrupted reduction) makes the TP ranks
route tokens differently and the run silently wrong.  Nothing in the step would notice.

Each check reduces every replicated parameter to two integer fingerprints of its bits (an
exact sum of the raw words and of their squares: any changed word moves them) and
all-gathers them over the TP group: one small collective, no host sync except the comparison.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from mythos_scale.parallel.distributed import ParallelLayout

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tp_replicated(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters every TP rank holds whole (no TP :class:`~.shard.ShardSpec`)."""
    return [(name, p) for name, p in model.named_parameters()
            if getattr(getattr(p, "mythos_shard", None), "group", None) != "tp"]


def fingerprints(params: list[tuple[str, torch.Tensor]], chunk: int = 1 << 24) -> torch.Tensor:
    """(n_params, 2) int64: per parameter, the wrapping sums of its raw bits and of their squares,
    taken in chunks (bounded temporary memory).  Integer sums are exact and independent of the
    reduction order, so equal copies give equal fingerprints on every device, and any changed
    word moves the first sum."""
    rows = []
    for _, p in params:
        bits = p.detach().reshape(-1).view(_INT_VIEW[p.element_size()])
        total = torch.zeros(2, dtype=torch.long, device=p.device)
        for part in bits.split(chunk):
            wide = part.long()
            total += torch.stack([wide.sum(), (wide * wide).sum()])
        rows.append(total)
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.long)


def replica_drift(model: nn.Module, layout: ParallelLayout) -> str | None:
    """None when every TP rank holds the same replicated parameters, else a message naming the
    first that differs and the TP ranks whose copies disagree.  Every rank of the TP group calls it."""
    if layout.tp == 1:
        return None
    params = tp_replicated(model)
    mine = fingerprints(params).to(layout.device)
    everyone = [torch.empty_like(mine) for _ in range(layout.tp)]
    dist.all_gather(everyone, mine, group=layout.tp_group)
    stacked = torch.stack(everyone)  # (tp, n_params, 2)
    differs = (stacked != stacked[:1]).any(dim=2).any(dim=0)
    # Every rank stops when any TP group drifted (else the others would wait in their next
    # collective); each of a drifted group's ranks counts 1.
    drifted = differs.any().to(torch.int32).reshape(1)
    dist.all_reduce(drifted)
    if int(drifted) == 0:
        return None
    if not bool(differs.any()):
        return (f"the TP-replicated parameters differ on {int(drifted) // layout.tp} TP group(s), not rank {layout.rank}'s: "
                "stopping with them (their ranks name the parameter)")
    first = int(differs.nonzero()[0, 0])
    groups: dict[tuple[int, int], list[int]] = {}
    for tp_rank in range(layout.tp):
        groups.setdefault(tuple(stacked[tp_rank, first].tolist()), []).append(tp_rank)
    return (f"the TP-replicated parameter {params[first][0]} differs across the tensor-parallel ranks of rank "
            f"{layout.rank}'s TP group (TP ranks holding equal copies: {sorted(groups.values())}; "
            f"{int(differs.sum())} of {len(params)} replicated parameters differ). Routing and halting would diverge "
            "between TP ranks: stopping. Resume from the last checkpoint; if it recurs, look for a non-deterministic "
            "kernel or a rank-local update of that parameter")

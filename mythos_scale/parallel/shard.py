"""Partition info on parameters: which slice of a logical tensor a rank holds.

The parallelize pass marks every parameter it shards with ``param.mythos_shard = ShardSpec(...)``:
this rank's tensor is ``global_tensor.narrow(dim, offset, param.shape[dim])``.  Parameters without
the attribute are replicated over TP and EP.  Names stay the plain model's, so a logical tensor
is identified by its name (the contract with the checkpoint code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    global_shape: tuple[int, ...]
    offset: int
    group: Literal["tp", "ep"]


def shard_parameter(param: torch.nn.Parameter, dim: int, rank: int, size: int, group: Literal["tp", "ep"]) -> None:
    """Keep only slice ``rank`` of ``size`` equal slices of ``param`` along ``dim`` (in place: the
    Parameter object, its name and attributes stay) and record it in ``param.mythos_shard``."""
    full = param.shape[dim]
    if full % size:
        raise ValueError(f"cannot split dimension {dim} of size {full} into {size} equal parts")
    local = full // size
    spec = ShardSpec(dim=dim, global_shape=tuple(param.shape), offset=rank * local, group=group)
    param.data = param.data.narrow(dim, spec.offset, local).clone()
    param.mythos_shard = spec


def gather_logical(tensor: torch.Tensor, spec: ShardSpec | None, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The logical tensor from every rank's slice (``tensor`` is this rank's slice of ``spec``, or
    the whole tensor when ``spec`` is None).  Every rank of ``group`` calls this; slices are
    equal-sized and ordered by group rank, as :func:`shard_parameter` cuts them."""
    if spec is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    full = torch.cat(parts, dim=spec.dim)
    if tuple(full.shape) != spec.global_shape:
        raise ValueError(f"gathered shape {tuple(full.shape)} is not the recorded {spec.global_shape}")
    return full

"""How a parameter is split over tensor- or expert-parallel ranks (set by the parallelize pass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ShardSpec:
    """``param.mythos_shard``: this rank's tensor is ``global_tensor.narrow(dim, offset,
    param.shape[dim])`` of the logical tensor of shape ``global_shape``.  Parameters without it
    are replicated over TP and EP (their global tensor is the local one)."""

    dim: int
    global_shape: tuple[int, ...]
    offset: int
    group: Literal["tp", "ep"]

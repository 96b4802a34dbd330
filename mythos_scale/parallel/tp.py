"""Tensor parallelism for MLA and the SwiGLU FFNs, applied to a built model (Megatron's split).

Per MLA block: the query up-projection (``wq`` or ``wq_b``) and ``wkv_b`` are column-parallel by
heads, ``wo`` row-parallel; ``wq_a``, ``wkv_a`` (with the shared rope key) and their norms stay
replicated.  Dense FFNs and shared experts: gate/up column-parallel, down row-parallel.  Routed
experts stay replicated over TP (see :mod:`mythos_scale.parallel.ep`); so do the embedding, the
injection, the router and the norms.

Why our own small layers and not megatron-core's Column/RowParallelLinear: a core projection is a
:class:`~mythos_scale.model.layers.LoopLinear`, a weight plus one rank-r LoRA adapter per loop
iteration, which Megatron's layers cannot hold, and their initialization would not reproduce the
single-process weights.  So the pass keeps the modules (and the parameter names), narrows their
weights in place and swaps their class for a TP subclass whose forward adds Megatron's two
conjugate operators on the layout's TP group (megatron-core's process groups): ``copy``
(identity forward, all-reduce of the gradient backward) where a replicated tensor enters
head-sharded compute, and ``reduce`` (all-reduce forward, identity backward) where partial
outputs leave it.  Each replicated parameter then gets its full gradient on every TP rank.
The two operators are written here, not taken from ``megatron.core.tensor_parallel.mappings``:
megatron-core all-reduces ``tensor.contiguous()`` in place and returns ``tensor``, so a
non-contiguous gradient (the shared rope key's is a slice of ``wkv_a``'s output gradient) is
silently left unreduced; the equality test caught it (1% gradient errors).

Depth LoRA ``W_t = W + B_t A_t`` shards with its base weight:

- column-parallel base: ``B_t`` split on its rows with ``W``, ``A_t`` replicated.  ``A_t x`` is
  computed from the replicated input and enters the parallel region through ``copy``, so the
  gradient reaching ``A_t`` is summed over the ranks' ``B_t`` slices (otherwise each rank's
  replicated ``A_t`` would see only its own heads' part).
- row-parallel base: ``A_t`` split on its columns with ``W``, ``B_t`` replicated.  The partial
  ``x_r W_r^T`` and the partial rank-r ``x_r A_r^T`` are all-reduced together (one collective),
  then ``B_t`` is applied to the full rank-r activation, so ``B_t``'s gradient is complete.
  (Applying ``B_t`` to the partial activation before the all-reduce would be correct in the
  forward and give ``B_t`` a partial gradient.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mythos_scale.model.attention import GQA, MLA
from mythos_scale.model.layers import DenseFFN, LoopLinear
from mythos_scale.parallel.distributed import ParallelLayout
from mythos_scale.parallel.shard import shard_parameter


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the gradient is summed over the TP group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Sum over the TP group forward; the (replicated) gradient passes through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ReduceFromTensorParallel.apply(x, group)


class ColumnParallelLoopLinear(LoopLinear):
    """This rank's slice of the output features; the input is replicated over the TP group."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.tp_group), self.weight)
        lora = self.adapter(loop)
        if lora is not None:
            a, b = lora
            y = y + F.linear(copy_to_tp(F.linear(x, a), self.tp_group), b)
        return y


class RowParallelLoopLinear(LoopLinear):
    """This rank's slice of the input features; the output is all-reduced (replicated)."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        lora = self.adapter(loop)
        if lora is None:
            return reduce_from_tp(y, self.tp_group)
        a, b = lora
        both = reduce_from_tp(torch.cat((y, F.linear(x, a)), dim=-1), self.tp_group)
        y, z = both.split([y.shape[-1], a.shape[0]], dim=-1)
        return y + F.linear(z, b)


class TensorParallelMLA(MLA):
    """MLA with ``n_heads / tp`` heads; the shared rope key's gradient is summed over TP ranks."""

    tp_group: dist.ProcessGroup

    def _shared_rope_key(self, k_rope: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(k_rope, self.tp_group)


class TensorParallelDenseFFN(DenseFFN):
    """SwiGLU FFN with ``hidden / tp`` hidden units: one ``copy`` in, one ``reduce`` out."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.tp_group)
        return reduce_from_tp(super().forward(x), self.tp_group)


def _swap_class(module: nn.Module, cls: type, group: dist.ProcessGroup) -> None:
    module.__class__ = cls
    module.tp_group = group


def _shard(param: nn.Parameter | None, dim: int, rank: int, size: int) -> None:
    if param is not None:
        shard_parameter(param, dim, rank, size, "tp")
        param.tensor_model_parallel = True  # DeepSpeed: counted on every TP rank in the grad norm


def shard_tensor_parallel(model: nn.Module, rank: int, size: int, group: dist.ProcessGroup) -> None:
    """Keep TP rank ``rank``'s slice (of ``size``) of every MLA and dense FFN, in place, with their
    collectives on ``group``."""
    for module in list(model.modules()):
        if isinstance(module, GQA):
            raise ValueError("tensor parallelism is implemented for MLA only (the config schema refuses GQA)")
        if isinstance(module, MLA):
            for column in (module.wq if hasattr(module, "wq") else module.wq_b, module.wkv_b):
                _shard(column.weight, 0, rank, size)
                _shard(column.lora_b, 1, rank, size)  # (loops, out, r)
                _swap_class(column, ColumnParallelLoopLinear, group)
            _shard(module.wo.weight, 1, rank, size)
            _shard(module.wo.lora_a, 2, rank, size)  # (loops, r, in)
            _swap_class(module.wo, RowParallelLoopLinear, group)
            _swap_class(module, TensorParallelMLA, group)
        elif isinstance(module, DenseFFN):
            _shard(module.w_gate.weight, 0, rank, size)
            _shard(module.w_up.weight, 0, rank, size)
            _shard(module.w_down.weight, 1, rank, size)
            _swap_class(module, TensorParallelDenseFFN, group)


def apply_tp(model: nn.Module, layout: ParallelLayout) -> None:
    """Shard ``model`` in place over ``layout``'s TP group (no-op for tp = 1)."""
    if layout.tp > 1:
        shard_tensor_parallel(model, layout.tp_rank, layout.tp, layout.tp_group)

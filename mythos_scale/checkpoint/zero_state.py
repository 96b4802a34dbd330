"""A DeepSpeed ZeRO-1/2 engine's state as pieces of logical tensors, and back, in any layout.

ZeRO-1/2 (DeepSpeed 0.19, ``DeepSpeedZeroOptimizer``) keeps per optimizer param group one flat
fp32 partition per rank (``single_partition_of_fp32_groups[i]``: the master weights) and the
Adam state of that flat tensor (``optimizer.state[flat]``: ``exp_avg``, ``exp_avg_sq``, ``step``).
A parameter with elements in this rank's partition carries ``param._hp_mapping``: its elements
``lp_fragment_address`` (flattened) sit at ``hp_fragment_address`` of the flat partition.
Those two addresses and the parameter's shard (``param.mythos_shard``, set by the parallelize
pass) place each piece in the logical tensor; see :mod:`.format`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mythos_scale.checkpoint.format import BUFFER, MASTER, CheckpointReader, Piece, tensor_key


@dataclass(frozen=True)
class LocalPiece:
    """One parameter's piece in this rank's ZeRO partition."""

    name: str
    shape: tuple[int, ...]  # the logical (unsharded) shape
    piece: Piece
    group: int  # the optimizer param group (one flat partition each)
    flat_start: int  # where the piece starts in that group's flat partition


def _shard(param: nn.Parameter) -> tuple[tuple[int, ...], int, int, int]:
    """(logical shape, dim, offset, length) of the shard of the logical tensor ``param`` holds."""
    spec = getattr(param, "mythos_shard", None)
    if spec is None:
        shape = tuple(param.shape) or (1,)
        return tuple(param.shape), 0, 0, shape[0]
    return tuple(spec.global_shape), spec.dim, spec.offset, param.shape[spec.dim]


def local_pieces(model: nn.Module, tp_rank: int, writers_only: bool) -> list[LocalPiece]:
    """The pieces of this rank's ZeRO partitions.  With ``writers_only``, those this rank writes:
    a parameter not split by tensor parallelism is identical on every rank of a TP group, so
    only TP rank 0 writes it."""
    pieces = []
    for name, param in model.named_parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        spec = getattr(param, "mythos_shard", None)
        if writers_only and tp_rank != 0 and (spec is None or spec.group != "tp"):
            continue
        shape, dim, offset, length = _shard(param)
        lp = mapping.lp_fragment_address
        pieces.append(LocalPiece(name, shape, Piece(dim, offset, length, lp.start, lp.numel),
                                 mapping.param_group_index, mapping.hp_fragment_address.start))
    return pieces


def logical_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: _shard(param)[0] for name, param in model.named_parameters()}


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=True)
    return {name: buf for name, buf in model.named_buffers() if name in state}


def _flat_groups(optimizer) -> list[torch.Tensor]:
    return optimizer.single_partition_of_fp32_groups


def optimizer_state_keys(optimizer) -> list[str]:
    """Names of the per-element optimizer states (Adam: exp_avg, exp_avg_sq), sorted."""
    keys = set()
    for flat in _flat_groups(optimizer):
        for key, value in optimizer.optimizer.state.get(flat, {}).items():
            if torch.is_tensor(value) and value.shape == flat.shape:
                keys.add(key)
    return sorted(keys)


def optimizer_step(optimizer) -> int:
    """Adam's step count (equal in every group: DeepSpeed steps all groups or, on overflow, none)."""
    steps = {int(optimizer.optimizer.state[flat]["step"]) for flat in _flat_groups(optimizer)
             if "step" in optimizer.optimizer.state.get(flat, {})}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer param groups disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


class HostSnapshot:
    """This rank's flat fp32 partitions and optimizer states copied to host memory (pinned on a
    GPU), so a background writer can write them while training changes the originals.  The
    buffers are kept and reused by the next snapshot."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._event: Any = None

    def _host(self, key: tuple[str, int], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
            self._buffers[key] = buf
        return buf

    def take(self, optimizer, kinds: list[str]) -> dict[tuple[str, int], torch.Tensor]:
        """Copy ``master`` and the optimizer states ``kinds`` of every group; on a GPU the copies
        are queued on the current stream (later kernels that change the originals run after
        them) and :meth:`wait` waits for them."""
        out = {}
        for i, flat in enumerate(_flat_groups(optimizer)):
            state = optimizer.optimizer.state.get(flat, {})
            for kind in [MASTER, *kinds]:
                source = flat.detach() if kind == MASTER else state.get(kind)
                host = self._host((kind, i), flat)
                if source is None:  # no step taken yet: Adam's state is still zero
                    host.zero_()
                else:
                    host.copy_(source, non_blocking=source.is_cuda)
                out[kind, i] = host
        self._event = None
        if any(flat.is_cuda for flat in _flat_groups(optimizer)):
            self._event = torch.cuda.Event()
            self._event.record()
        return out

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


def file_tensors(pieces: list[LocalPiece], host: dict[tuple[str, int], torch.Tensor], kinds: list[str],
                 buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of this rank's file: each piece of each kind, a view of the host snapshot."""
    out = {}
    for kind in [MASTER, *kinds]:
        for p in pieces:
            out[tensor_key(kind, p.name)] = host[kind, p.group].narrow(0, p.flat_start, p.piece.numel)
    out.update({tensor_key(BUFFER, name): buf for name, buf in buffers.items()})
    return out


def load_pieces(model: nn.Module, optimizer, reader: CheckpointReader) -> None:
    """Fill this rank's master weights and optimizer state from ``reader`` (any layout), set
    Adam's step, then rebuild the module weights from the masters (DeepSpeed's own
    ``update_lp_params``: copy and cast this rank's partition, all-gather the others over the
    data-parallel group), and load the persistent buffers."""
    record = reader.record
    step, kinds = int(record["optimizer"]["step"]), list(record["optimizer"]["states"])
    opt_state = optimizer.optimizer.state
    for flat in _flat_groups(optimizer):
        if step and not opt_state.get(flat):
            # the state torch's AdamW creates on its first step, filled below
            group = next(g for g in optimizer.optimizer.param_groups if g["params"][0] is flat)
            on_device = group.get("fused") or group.get("capturable")
            opt_state[flat] = {"step": torch.tensor(float(step), dtype=torch.float32,
                                                    device=flat.device if on_device else "cpu"),
                               **{kind: torch.zeros_like(flat) for kind in kinds}}
        elif step:
            opt_state[flat]["step"].fill_(float(step))
    for p in local_pieces(model, tp_rank=0, writers_only=False):
        flat = _flat_groups(optimizer)[p.group]
        for kind in [MASTER, *kinds] if step else [MASTER]:
            target = flat if kind == MASTER else opt_state[flat][kind]
            reader.read_into(kind, p.name, p.piece, target.detach().narrow(0, p.flat_start, p.piece.numel))
    if step:
        optimizer._lazy_init_hp_params_optimizer_state()  # DeepSpeed's per-parameter views of the state
    optimizer.update_lp_params()
    with torch.no_grad():
        for name, buf in persistent_buffers(model).items():
            buf.copy_(reader.read_buffer(name))


def check_same_parameters(model: nn.Module, record: dict[str, Any]) -> str | None:
    """Why the checkpoint's parameters are not this model's (names, logical shapes), or None."""
    mine = logical_shapes(model)
    saved = {name: tuple(entry["shape"]) for name, entry in record["params"].items()}
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or extra:
        return f"parameters missing from the checkpoint: {missing[:5]}; not in this model: {extra[:5]}"
    shapes = [f"{n}: {saved[n]} saved, {mine[n]} now" for n in sorted(mine) if mine[n] != saved[n]]
    if shapes:
        return "parameter shapes differ: " + "; ".join(shapes[:5])
    counted = {name: sum(f[-1] for f in entry["fragments"]) for name, entry in record["params"].items()}
    holes = [n for n, c in counted.items() if c != math.prod(saved[n])]
    return f"the saved pieces do not cover parameters {holes[:5]}" if holes else None

"""The checkpoint format: logical (unsharded) fp32 tensors by parameter name, written in pieces.

A checkpoint does not depend on the layout that wrote it.  What it holds, per parameter of the
plain model: the fp32 master weight and each optimizer state (Adam's ``exp_avg``,
``exp_avg_sq``), as the *logical* tensor, the one the unsharded model names and shapes.  Each
rank writes the pieces of them it owns, as they are in its memory and without communicating:

- a **piece** of a logical tensor is a run ``[start, start + numel)`` of the flattened shard
  ``logical.narrow(dim, offset, length)``: tensor/expert parallelism gives a rank the shard
  (``param.mythos_shard``; the whole tensor when unsharded), ZeRO-1/2 a run of it (its partition);
- ``rank_<r>.safetensors`` (one per rank): tensors ``master/<name>``, ``exp_avg/<name>``, ... each
  one piece (1-D fp32), rank 0's also the persistent buffers ``buffer/<name>`` (whole: the MoE
  balance biases); ``rng/*`` tensors and header metadata hold the rank's RNG state;
- ``COMPLETE.json``, written last by rank 0 once every rank's file is durable (the commit, see
  :mod:`.checkpointer`): the step, the layout that wrote it, the config, the trainer and data
  state, the Adam step, where every piece is, and every file's size and xxh3-64 hash.

Loading into any layout reads, for each piece a rank needs, only the byte ranges of the saved
pieces that overlap it (safetensors slices; see :func:`copy_overlap`); the overlap is computed
from the record, so a rank opens only the files holding pieces it needs.  The standard
safetensors tools open the files; :func:`read_model_state` and :func:`read_checkpoint_info` read
a checkpoint with neither DeepSpeed nor a process group.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

FORMAT_VERSION = 2
MANIFEST = "COMPLETE.json"
MASTER = "master"  # the fp32 master weights; optimizer states use their own names (exp_avg, ...)
BUFFER = "buffer"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and why."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def tensor_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


# --------------------------------------------------------------------------- pieces


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + numel)`` of ``logical.narrow(dim, offset, length)`` flattened."""

    dim: int
    offset: int
    length: int
    start: int
    numel: int

    @staticmethod
    def whole(shape: tuple[int, ...], dim: int = 0) -> Piece:
        shape = _shape(shape)
        return Piece(dim, 0, shape[dim], 0, math.prod(shape))

    def on_dim(self, shape: tuple[int, ...], dim: int) -> Piece:
        """The same piece described along ``dim``: possible when it is not narrowed on its own dim."""
        if dim == self.dim:
            return self
        if self.offset != 0 or self.length != _shape(shape)[self.dim]:
            raise ValueError(f"a piece narrowed on dim {self.dim} cannot be described along dim {dim}")
        return Piece(dim, 0, _shape(shape)[dim], self.start, self.numel)


def _shape(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(shape) or (1,)  # a 0-dim tensor is one element


def _runs(shape: tuple[int, ...], piece: Piece) -> list[tuple[int, int, int, int, int, int]]:
    """The piece as at most three rectangles of the logical tensor viewed as a matrix [rows, cols]
    (rows = the dims before ``piece.dim``, cols = that dim and the ones after): each
    ``(row0, row1, col0, col1, first, stride)``, its elements at ``first + r * stride + c`` of the
    piece's buffer (r, c counted from row0, col0).  A flat run of a shard narrowed on ``dim`` is
    contiguous within each row of that matrix: a partial first row, full rows, a partial last row."""
    shape = _shape(shape)
    inner = math.prod(shape[piece.dim + 1:])
    width, base = piece.length * inner, piece.offset * inner
    if piece.numel == 0:
        return []
    r0, c0 = divmod(piece.start, width)
    r1, c1 = divmod(piece.start + piece.numel, width)  # exclusive end
    if r0 == r1:
        rects = [(r0, r0 + 1, c0, c1, 0)]
    else:
        rects = [(r0, r0 + 1, c0, width, 0)]
        first = width - c0
        if r1 > r0 + 1:
            rects.append((r0 + 1, r1, 0, width, first))
            first += (r1 - r0 - 1) * width
        if c1:
            rects.append((r1, r1 + 1, 0, c1, first))
    return [(ra, rb, base + ca, base + cb, s, width) for ra, rb, ca, cb, s in rects]


def copy_overlap(shape: tuple[int, ...], source: Piece, read: Callable[[int, int], torch.Tensor],
                 target: Piece, out: torch.Tensor) -> int:
    """Copy the elements ``source`` and ``target`` (pieces of one logical tensor of ``shape``)
    have in common into ``out`` (the target's 1-D buffer); ``read(a, b)`` returns elements
    ``[a, b)`` of the source's buffer and is called only for ranges that overlap.  Returns the
    number of elements copied."""
    dim = target.dim if target.offset or target.length != _shape(shape)[target.dim] else source.dim
    source, target = source.on_dim(shape, dim), target.on_dim(shape, dim)
    copied = 0
    for sa, sb, sca, scb, sfirst, sstride in _runs(shape, source):
        for ta, tb, tca, tcb, tfirst, tstride in _runs(shape, target):
            r_lo, r_hi, c_lo, c_hi = max(sa, ta), min(sb, tb), max(sca, tca), min(scb, tcb)
            if r_lo >= r_hi or c_lo >= c_hi:
                continue
            rows, cols = r_hi - r_lo, c_hi - c_lo
            lo = sfirst + (r_lo - sa) * sstride + (c_lo - sca)
            hi = sfirst + (r_hi - 1 - sa) * sstride + (c_hi - sca)
            chunk = read(lo, hi)
            src = chunk.as_strided((rows, cols), (sstride, 1), chunk.storage_offset())
            at = tfirst + (r_lo - ta) * tstride + (c_lo - tca)
            out.as_strided((rows, cols), (tstride, 1), out.storage_offset() + at).copy_(src)
            copied += rows * cols
    return copied


# --------------------------------------------------------------------------- the record


def read_record(tag_dir: Path) -> dict[str, Any]:
    """The parsed commit record of ``tag_dir``; ValueError when it is not a valid one."""
    path = Path(tag_dir) / MANIFEST
    try:
        record = json.loads(path.read_text())
        version = record.get("format")
        if version != FORMAT_VERSION:
            raise ValueError(f"format {version!r}: written by another release of mythos_scale, this one "
                             f"reads format {FORMAT_VERSION}")
        for key in ("step", "world_size", "layout", "config", "trainer", "optimizer", "params",
                    "buffers", "files"):
            record[key]  # noqa: B018 - presence check
        record["step"], record["world_size"] = int(record["step"]), int(record["world_size"])
        for entry in record["files"].values():
            int(entry["bytes"]), str(entry["xxh3"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a valid checkpoint record ({exc})") from None
    return record


def read_checkpoint_info(tag_dir: str | Path) -> dict[str, Any]:
    """What a checkpoint is, from its commit record alone: step, tokens seen, the layout and ZeRO
    stage that wrote it, the config, the trainer and data state, the Adam step, each parameter's
    logical shape, each file's size and the total.  Needs no DeepSpeed and no process group."""
    record = read_record(Path(tag_dir))
    return {
        "step": record["step"], "tokens_seen": record["trainer"].get("tokens_seen"),
        "world_size": record["world_size"], "layout": record["layout"],
        "zero_stage": record["layout"].get("zero_stage"), "config": record["config"],
        "trainer": record["trainer"], "optimizer": record["optimizer"],
        "params": {name: entry["shape"] for name, entry in record["params"].items()},
        "buffers": {name: entry["shape"] for name, entry in record["buffers"].items()},
        "files": {name: entry["bytes"] for name, entry in record["files"].items()},
        "bytes": sum(entry["bytes"] for entry in record["files"].values()),
    }


# --------------------------------------------------------------------------- reading


class CheckpointReader:
    """Reads pieces of a committed checkpoint's logical tensors; opens each file once, lazily.
    Use as a context manager (the files stay open until it exits)."""

    def __init__(self, tag_dir: str | Path, record: dict[str, Any] | None = None):
        self.dir = Path(tag_dir)
        self.record = record if record is not None else read_record(self.dir)
        self._stack = ExitStack()
        self._files: dict[str, Any] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._files.clear()

    def _slice(self, file: str, key: str):
        if file not in self._files:
            try:
                self._files[file] = self._stack.enter_context(safe_open(self.dir / file, framework="pt"))
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise CheckpointError(f"cannot read {self.dir / file}: {exc}") from None
        try:
            return self._files[file].get_slice(key)
        except Exception as exc:
            raise CheckpointError(f"{self.dir / file} lacks tensor {key!r} that {MANIFEST} lists ({exc})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.record["params"][name]["shape"])

    def read_into(self, kind: str, name: str, target: Piece, out: torch.Tensor) -> None:
        """Fill ``out`` (1-D, ``target.numel`` elements) with piece ``target`` of state ``kind``
        (``master`` or an optimizer state) of parameter ``name``."""
        entry = self.record["params"].get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint {self.dir} has no parameter {name!r}")
        shape, key = tuple(entry["shape"]), tensor_key(kind, name)
        copied = 0
        for file, dim, offset, length, start, numel in entry["fragments"]:
            source = Piece(dim, offset, length, start, numel)
            if (dim, offset, length) == (target.dim, target.offset, target.length) and (
                    start >= target.start + target.numel or target.start >= start + numel):
                continue  # runs of the same shard that do not meet: the common ZeRO case, decided cheaply
            # The overlap is found from the record; a file is opened only for a piece that overlaps
            # (at 1,000 ranks a rank needs a few of the thousands of pieces of each parameter).
            opened = functools.cache(lambda file=file: self._slice(file, key))
            try:
                with torch.no_grad():
                    copied += copy_overlap(shape, source, lambda a, b, t=opened: t()[a:b], target, out)
            except ValueError as exc:  # sharded on another dim than when saved
                raise CheckpointError(f"checkpoint {self.dir}: parameter {name!r}: {exc}") from None
        if copied != target.numel:
            raise CheckpointError(f"checkpoint {self.dir}: the saved pieces of {kind} {name!r} cover {copied} of "
                                  f"the {target.numel} elements this rank needs (a damaged {MANIFEST}?)")

    def read_param(self, kind: str, name: str) -> torch.Tensor:
        """The whole logical tensor ``kind`` of parameter ``name``, fp32."""
        shape = self.shape(name)
        out = torch.empty(shape, dtype=torch.float32)
        self.read_into(kind, name, Piece.whole(shape), out.view(-1))
        return out

    def read_buffer(self, name: str) -> torch.Tensor:
        entry = self.record["buffers"][name]
        return self._slice(entry["file"], tensor_key(BUFFER, name))[:].reshape(entry["shape"])


def read_model_state(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict as it was saved: every parameter as its full logical fp32 master
    weight and every persistent buffer, by the plain model's names (``model.load_state_dict``
    takes it).  Needs no DeepSpeed and no process group."""
    with CheckpointReader(tag_dir) as reader:
        state = {name: reader.read_param(MASTER, name) for name in reader.record["params"]}
        state.update({name: reader.read_buffer(name) for name in reader.record["buffers"]})
    return state

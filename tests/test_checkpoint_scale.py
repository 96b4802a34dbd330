"""Reading a checkpoint written by 1,000 ranks: a reading rank opens only the files that hold
pieces it needs (the overlap is found from the commit record), and reads the right values."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mythos_scale.checkpoint import format as ckpt_format
from mythos_scale.checkpoint.format import MASTER, CheckpointReader, Piece, rank_file, tensor_key

WRITERS = 1000
PER_RANK = 3  # elements of each parameter per writing rank (ZeRO-style flat runs)
PARAMS = {"core.0.w": (WRITERS * PER_RANK // 6, 6), "core.0.b": (WRITERS * PER_RANK,)}
KINDS = (MASTER, "exp_avg")


def logical(name: str, kind: str) -> torch.Tensor:
    """The value of each logical tensor: distinct per element, parameter and kind."""
    numel = WRITERS * PER_RANK
    return (torch.arange(numel, dtype=torch.float32) + 0.5 * KINDS.index(kind) + (10 * numel if "w" in name else 0)
            ).view(PARAMS[name])


def write_checkpoint(tag_dir: Path) -> dict:
    """Rank r's file holds elements [r * PER_RANK, (r + 1) * PER_RANK) of every flat logical tensor;
    the record lists the 1,000 fragments of each parameter, as the checkpointer writes them."""
    tag_dir.mkdir()
    for rank in range(WRITERS):
        run = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        save_file({tensor_key(kind, name): logical(name, kind).reshape(-1)[run].clone()
                   for name in PARAMS for kind in KINDS}, str(tag_dir / rank_file(rank)))
    return {"params": {name: {"shape": list(shape), "fragments": [
        [rank_file(r), 0, 0, shape[0], r * PER_RANK, PER_RANK] for r in range(WRITERS)]}
        for name, shape in PARAMS.items()}}


def read_as(tag_dir: Path, record: dict, rank: int, world: int, monkeypatch) -> tuple[int, float]:
    """Read this rank's flat run of every parameter and state as a ZeRO rank of ``world`` would;
    check the values; return (files opened, seconds)."""
    opened = []
    real_open = ckpt_format.safe_open
    monkeypatch.setattr(ckpt_format, "safe_open", lambda path, **kw: (opened.append(path), real_open(path, **kw))[1])
    start = time.perf_counter()
    with CheckpointReader(tag_dir, record) as reader:
        for name, shape in PARAMS.items():
            numel = WRITERS * PER_RANK
            per = numel // world
            target = Piece(0, 0, shape[0], rank * per, per)
            for kind in KINDS:
                out = torch.empty(per)
                reader.read_into(kind, name, target, out)
                assert torch.equal(out, logical(name, kind).reshape(-1)[rank * per:(rank + 1) * per]), (name, kind)
    seconds = time.perf_counter() - start
    monkeypatch.setattr(ckpt_format, "safe_open", real_open)
    return len(opened), seconds


def test_thousand_rank_checkpoint_opens_only_needed_files(tmp_path, monkeypatch):
    tag_dir = tmp_path / "step_00000010"
    record = write_checkpoint(tag_dir)
    # The same layout (1,000 ranks): each reading rank needs one piece per tensor, all in one file.
    for rank in (0, 517, WRITERS - 1):
        opens, seconds = read_as(tag_dir, record, rank, WRITERS, monkeypatch)
        print(f"1,000 -> 1,000 ranks, rank {rank}: {opens} file(s) opened, {seconds * 1e3:.1f} ms")
        assert opens == 1
    # Resharded to 8 ranks: each needs 1,000 / 8 = 125 writers' pieces; rank 3 the 125 from 375.
    opens, seconds = read_as(tag_dir, record, 3, 8, monkeypatch)
    print(f"1,000 -> 8 ranks, rank 3: {opens} file(s) opened, {seconds * 1e3:.1f} ms")
    assert opens == WRITERS // 8

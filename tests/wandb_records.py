"""Reads a W&B run file (``run-<id>.wandb``, what offline mode writes and ``wandb sync`` uploads).

The file is the W&B header (``:W&B``, magic, version: 7 bytes) then a LevelDB-style log: 32 KiB
blocks of chunks, each ``crc32 (4) | length (2) | type (1)`` then the bytes; a record is one FULL
chunk or FIRST, MIDDLE..., LAST; each record is a ``wandb_internal_pb2.Record``.  wandb itself
ships no reader for it (its Go core writes it), so the tests carry this one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def run_info(path: Path) -> tuple[str, list[str]]:
    """(run id, tags) of the run file."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id, list(record.run.tags)
    raise AssertionError(f"{path} holds no run record")


def history(path: Path) -> dict[int, dict[str, float]]:
    """Step -> the values logged at that step (W&B's own ``_step``, ``_runtime``... left out)."""
    out: dict[int, dict[str, float]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                out.setdefault(record.history.step.num, {})[key] = json.loads(item.value_json)
    return out

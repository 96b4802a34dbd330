"""Sharded checkpoints through DeepSpeed, committed atomically, with exact-resume state.

Layout of ``<run>/checkpoints``::

    step_00000200/                 one checkpoint ("tag")
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt    (DeepSpeed, per rank)
        trainer_rank_00000.pt      per-rank state DeepSpeed does not keep: RNG, data loader
        COMPLETE.json              written last, by rank 0, after every rank finished: the
                                   size of every file, the step, the world size
    latest                         the tag of the newest committed checkpoint

A save is committed in three moves: every rank writes its files; a barrier; rank 0 writes
``COMPLETE.json`` and then atomically replaces ``latest``.  A crash at any point before
that leaves the previous checkpoint as the latest.  On load, ``latest`` is followed and
its files are checked against ``COMPLETE.json``; a missing or truncated file sends the
loader back to the previous committed checkpoint, with a log line saying why.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MANIFEST = "COMPLETE.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and why."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def validate_checkpoint(tag_dir: Path) -> str | None:
    """Return why ``tag_dir`` cannot be used, or None when every recorded file is intact."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return f"{manifest.name} is missing (the save did not finish)"
    try:
        info = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        return f"{manifest} is not valid JSON ({exc})"
    for name, size in info["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"file {path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"file {path} has {actual} bytes, {size} were written (truncated or altered)"
    return None


@dataclass
class ResumePoint:
    tag: str
    step: int
    client_state: dict[str, Any]
    trainer_state: dict[str, Any]


class Checkpointer:
    """Saves and finds checkpoints of one run.  Every rank calls every method."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ------------------------------------------------------------------ save

    def save(self, engine, step: int, client_state: dict[str, Any], trainer_state: dict[str, Any]) -> float:
        """Write a checkpoint for ``step`` on every rank and commit it; returns seconds taken."""
        start = time.perf_counter()
        tag = tag_for_step(step)
        tag_dir = self.dir / tag
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # an uncommitted leftover of an earlier crash at this step
        dist.barrier()
        # Our keys live under one name: DeepSpeed keeps keys of its own (skipped_steps, ...)
        # in the same dict and drops them from what load_checkpoint returns.
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"mythos": dict(client_state, step=step)},
                               save_latest=False)
        state = dict(trainer_state, rng=capture_rng_state())
        torch.save(state, tag_dir / f"trainer_rank_{self.rank:05d}.pt")
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
            _atomic_write_text(tag_dir / MANIFEST, json.dumps(
                {"step": step, "world_size": self.world_size, "files": files}, indent=1))
            _atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=tag)
        dist.barrier()
        return time.perf_counter() - start

    def _prune(self, keep: str) -> None:
        committed = sorted(p for p in self.dir.glob("step_*") if (p / MANIFEST).is_file())
        for old in committed[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def _candidates(self) -> list[Path]:
        """Committed tags, newest first, never newer than what ``latest`` points to."""
        if not self.dir.is_dir():
            return []
        tags = sorted((p for p in self.dir.glob("step_*") if p.is_dir()), reverse=True)
        latest_file = self.dir / LATEST
        if latest_file.is_file():
            latest = latest_file.read_text().strip()
            tags = [p for p in tags if p.name <= latest]
        return tags

    def find_resume_tag(self) -> Path | None:
        for tag_dir in self._candidates():
            problem = validate_checkpoint(tag_dir)
            if problem is None:
                return tag_dir
            if self.rank == 0:
                log.warning("checkpoint %s cannot be used: %s; trying the previous one", tag_dir.name, problem)
        return None

    def load(self, engine) -> ResumePoint | None:
        """Load the newest intact checkpoint into ``engine``; None when the run has none."""
        tag_dir = self.find_resume_tag()
        if tag_dir is None:
            return None
        info = json.loads((tag_dir / MANIFEST).read_text())
        if info["world_size"] != self.world_size:
            raise CheckpointError(
                f"checkpoint {tag_dir} was written by {info['world_size']} ranks, this run has "
                f"{self.world_size}; resume with the same number of ranks")
        trainer_file = tag_dir / f"trainer_rank_{self.rank:05d}.pt"
        trainer_state = torch.load(trainer_file, map_location="cpu", weights_only=False)
        load_path, client_state = engine.load_checkpoint(
            str(self.dir), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        restore_rng_state(trainer_state.pop("rng"))
        ours = client_state["mythos"]
        return ResumePoint(tag=tag_dir.name, step=int(ours["step"]), client_state=ours,
                           trainer_state=trainer_state)

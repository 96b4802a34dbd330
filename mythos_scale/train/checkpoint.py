"""Sharded checkpoints through DeepSpeed, committed atomically, with exact-resume state.

Layout of ``<run>/checkpoints``::

    step_00000200/                 one checkpoint ("tag")
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt    (DeepSpeed, per rank)
        trainer_rank_00000.pt      per-rank state DeepSpeed does not keep: RNG, data loader
        COMPLETE.json              written last, by rank 0, after every rank finished: the
                                   size of every file, the step, the world size
    latest                         the tag of the newest committed checkpoint
    unusable/step_00000100/        a committed checkpoint found damaged later, set aside

A save is committed in three moves: every rank writes its files; a barrier; rank 0 writes
``COMPLETE.json`` and then atomically replaces ``latest``.  A crash at any point before
that leaves the previous checkpoint as the latest.  On load, ``latest`` is followed and
its files are checked against ``COMPLETE.json``; a missing or truncated file sends the
loader back to the previous committed checkpoint, with a log line saying why.

What is kept (after each commit; the checkpoint just committed is the newest good one):

- the newest ``keep_last`` good checkpoints; older good ones are deleted;
- a checkpoint that was committed but is damaged now (a file truncated or altered, an unreadable
  ``COMPLETE.json``) is never counted as kept and never deleted: it is moved to
  ``checkpoints/unusable/`` (the log says so), out of the way of resume and pruning, for
  inspection; delete it when done;
- an interrupted save (a folder without ``COMPLETE.json``) holds nothing usable and is deleted;
- folders newer than the checkpoint just committed (left by an earlier attempt) are not touched.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
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
UNUSABLE = "unusable"  # damaged checkpoints are moved here, never deleted


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


def _commit_record(tag_dir: Path) -> dict[str, Any]:
    """The parsed ``COMPLETE.json`` of ``tag_dir``; ValueError when it is not a valid one."""
    try:
        info = json.loads((tag_dir / MANIFEST).read_text())
        record = {"step": int(info["step"]), "world_size": int(info["world_size"]),
                  "files": {str(k): int(v) for k, v in info["files"].items()}}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{tag_dir / MANIFEST} is not a valid checkpoint record ({exc!r})") from None
    return record


def validate_checkpoint(tag_dir: Path) -> str | None:
    """Return why ``tag_dir`` cannot be used, or None when every recorded file is intact."""
    if not (tag_dir / MANIFEST).is_file():
        return f"{MANIFEST} is missing (the save did not finish)"
    try:
        record = _commit_record(tag_dir)
    except (OSError, ValueError) as exc:
        return str(exc)
    for name, size in record["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"file {path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"file {path} has {actual} bytes, {size} were written (truncated or altered)"
    return None


@dataclass
class CheckpointScan:
    """What a run folder's checkpoints allow: the newest usable one (never newer than ``latest``)
    and those tried before it and rejected, with the reason."""

    usable: Path | None
    rejected: list[tuple[Path, str]]
    any_committed: bool  # a checkpoint was committed once (so the run has state to lose)

    @property
    def only_unusable(self) -> bool:
        return self.usable is None and self.any_committed

    def world_size(self) -> int:
        assert self.usable is not None
        return _commit_record(self.usable)["world_size"]


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
            problem = validate_checkpoint(tag_dir)
            if problem is not None and (tag_dir / MANIFEST).exists():
                self._set_aside(tag_dir, problem)
            else:  # an interrupted save, or an intact one of this step that this save redoes
                shutil.rmtree(tag_dir)
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
            self._prune(keep=tag_dir)
        dist.barrier()
        return time.perf_counter() - start

    def _tags(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir()) if self.dir.is_dir() else []

    def _prune(self, keep: Path) -> None:
        """Rank 0, right after committing ``keep``: see the module docstring for what is kept."""
        good = []
        for tag_dir in self._tags():
            if tag_dir.name > keep.name:
                continue
            problem = validate_checkpoint(tag_dir)
            if problem is None:
                good.append(tag_dir)
            elif (tag_dir / MANIFEST).exists():
                self._set_aside(tag_dir, problem)
            else:
                shutil.rmtree(tag_dir, ignore_errors=True)
        for old in good[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _set_aside(self, tag_dir: Path, problem: str) -> None:
        aside = self.dir / UNUSABLE
        aside.mkdir(exist_ok=True)
        target, n = aside / tag_dir.name, 1
        while target.exists():
            n += 1
            target = aside / f"{tag_dir.name}.{n}"
        tag_dir.rename(target)
        log.warning("checkpoint %s is damaged (%s): moved to %s for inspection; it is never resumed "
                    "from or counted as kept; delete it when done", tag_dir.name, problem, target)

    # ------------------------------------------------------------------ load

    def scan(self) -> CheckpointScan:
        """Find the newest usable checkpoint, newest first, never newer than ``latest``."""
        tags = self._tags()
        latest_file = self.dir / LATEST
        latest = latest_file.read_text().strip() if latest_file.is_file() else ""
        if re.fullmatch(r"step_\d{8}", latest):
            tags = [p for p in tags if p.name <= latest]
        rejected = []
        for tag_dir in reversed(tags):
            problem = validate_checkpoint(tag_dir)
            if problem is None:
                return CheckpointScan(tag_dir, rejected, True)
            rejected.append((tag_dir, problem))
        committed = bool(latest) or any((p / MANIFEST).exists() for p in tags)
        return CheckpointScan(None, rejected, committed)

    def load(self, engine, tag_dir: Path) -> ResumePoint:
        """Load checkpoint ``tag_dir`` (from :meth:`scan`) into ``engine``."""
        trainer_file = tag_dir / f"trainer_rank_{self.rank:05d}.pt"
        try:
            trainer_state = torch.load(trainer_file, map_location="cpu", weights_only=False)
            load_path, client_state = engine.load_checkpoint(
                str(self.dir), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as exc:  # torch and DeepSpeed raise many types for a damaged file
            raise CheckpointError(f"cannot load checkpoint {tag_dir}: {exc}") from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        restore_rng_state(trainer_state.pop("rng"))
        ours = client_state["mythos"]
        return ResumePoint(tag=tag_dir.name, step=int(ours["step"]), client_state=ours,
                           trainer_state=trainer_state)

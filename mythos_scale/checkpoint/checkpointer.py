"""Checkpoints of one run: asynchronous save, a commit that holds on shared file systems,
resume in any layout, and a save that fits the grace time of a preemption.

Layout of ``<run>/checkpoints``::

    step_00000200/            one checkpoint ("tag"): rank_*.safetensors, COMPLETE.json (see .format)
    latest                    the tag of the newest committed checkpoint
    unusable/step_00000100/   a committed checkpoint found damaged later, set aside

Saving (every rank calls every method, at the same points of the step loop):

1. rank 0 clears what an earlier attempt left under the same tag (its commit record first); a
   barrier;
2. each rank copies its pieces to host memory (the only part the step loop waits for) and a
   background thread writes its file: data, fsync of the file, fsync of the folder;
3. once every rank's writer is done (the trainer asks at each step, in the collective it makes
   anyway for stop requests), one gather brings rank 0 what each rank wrote (file name, size,
   xxh3-64 hash, where each piece is); rank 0 writes ``COMPLETE.json`` (temporary file, fsync,
   rename, fsync of the folder), then replaces ``latest`` the same way, and broadcasts the outcome;
4. rank 0 prunes old checkpoints in a background thread, after the commit.

No rank lists a folder to learn what another rank wrote, and a crash or a kill -9 at any point
before the rename of ``COMPLETE.json`` leaves the previous checkpoint the resume point.

Resuming: rank 0 alone lists the folder and proposes the newest checkpoint, never newer than
``latest``, whose files all have their recorded sizes; every rank hashes a share of its files
(its own when the layout is unchanged) and one that differs from its record rejects it; rank 0
broadcasts the choice.  So ranks whose listings differ (delayed visibility on a shared file
system) resume from the same step; a rank waits up to ``VISIBILITY_TIMEOUT_S`` for a file of
the chosen checkpoint to appear.  The checkpoint is loaded into any layout (see .zero_state).

What is kept (after each commit; the checkpoint just committed is the newest good one):

- the newest ``keep_last`` good checkpoints; older good ones are deleted;
- a checkpoint that was committed but is damaged now (a file truncated or altered, an unreadable
  ``COMPLETE.json``) is never counted as kept and never deleted: it is moved to
  ``checkpoints/unusable/`` (the log says so), out of the way of resume and pruning, for
  inspection; delete it when done;
- an interrupted save (a folder without ``COMPLETE.json``) holds nothing usable and is deleted;
- folders newer than the checkpoint just committed are not touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash
from safetensors import safe_open

from mythos_scale.checkpoint.format import MANIFEST, CheckpointError, CheckpointReader, rank_file, read_record
from mythos_scale.checkpoint.stop import STOP_MARGIN_S, SaveTimes, StopPlan, plan_stop
from mythos_scale.checkpoint.writer import WriteJob, fsync_dir
from mythos_scale.checkpoint.zero_state import (
    HostSnapshot,
    check_same_parameters,
    file_tensors,
    load_pieces,
    local_pieces,
    optimizer_state_keys,
    optimizer_step,
    persistent_buffers,
)
from mythos_scale.config import Config
from mythos_scale.parallel import ParallelLayout, sum_over_ranks

log = logging.getLogger(__name__)

LATEST = "latest"
UNUSABLE = "unusable"  # damaged checkpoints are moved here, never deleted
VISIBILITY_TIMEOUT_S = 60.0  # how long a rank waits for a file rank 0 saw to appear in its own view


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash leaves the old or the new content, durably."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _remove_tag(tag_dir: Path) -> None:
    """Delete a checkpoint folder, its commit record first: a crash midway leaves an interrupted
    save, never a committed checkpoint with files missing."""
    (tag_dir / MANIFEST).unlink(missing_ok=True)
    fsync_dir(tag_dir)
    shutil.rmtree(tag_dir, ignore_errors=True)


def validate_checkpoint(tag_dir: Path) -> str | None:
    """Why ``tag_dir`` cannot be used, or None when every recorded file has its recorded size
    (the hashes are checked on resume, by all ranks)."""
    if not (tag_dir / MANIFEST).is_file():
        return f"{MANIFEST} is missing (the save did not finish)"
    try:
        record = read_record(tag_dir)
    except (OSError, ValueError) as exc:
        return str(exc)
    for name, entry in record["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"file {path} is missing"
        actual = path.stat().st_size
        if actual != entry["bytes"]:
            return f"file {path} has {actual} bytes, {entry['bytes']} were written (truncated or altered)"
    return None


def _wait_visible(path: Path, size: int) -> bool:
    """Wait until ``path`` shows ``size`` bytes in this process's view of the file system (a
    shared file system may show another node's new files late); False after the timeout."""
    deadline, delay = time.monotonic() + VISIBILITY_TIMEOUT_S, 0.05
    while True:
        try:
            if path.stat().st_size == size:
                return True
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 2.0)


def _file_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why ``path`` is not the file its commit record describes, or None."""
    if not _wait_visible(path, entry["bytes"]):
        return f"file {path} is missing or has the wrong size (waited {VISIBILITY_TIMEOUT_S:.0f}s for it)"
    hasher = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            hasher.update(chunk)
    if hasher.hexdigest() != entry["xxh3"]:
        return f"file {path} differs from what was written (xxh3 {hasher.hexdigest()}, recorded {entry['xxh3']})"
    return None


# --------------------------------------------------------------------------- RNG


def seed_rng(seed: int, rank: int) -> None:
    """Seed this process's global RNGs (Python, NumPy, torch, CUDA) from ``(seed, rank)``: a run
    is then a function of its config, and so is a resume that does not restore them (another
    layout).  The trainer draws no random numbers itself; anything that does is reproducible."""
    rank_seed = seed * 100_003 + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)  # seeds CUDA too


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as tensors and safetensors metadata (strings)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    metadata = {"rng/python": json.dumps(random.getstate()),
                "rng/numpy": json.dumps([name, keys.tolist(), pos, has_gauss, gauss])}
    return tensors, metadata


def restore_rng_state(path: Path) -> None:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        torch.set_rng_state(f.get_tensor("rng/torch"))
        cuda = sorted(k for k in f.keys() if k.startswith("rng/cuda/"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([f.get_tensor(k) for k in cuda])
    version, state, gauss = json.loads(meta["rng/python"])
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["rng/numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- plans and figures


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


@dataclass
class ResumePoint:
    tag: str
    step: int
    trainer: dict[str, Any]  # what the trainer saved: tokens seen, data position, ...
    resharded: str | None  # what was resharded, when the layout differs from the checkpoint's


# --------------------------------------------------------------------------- the checkpointer


@dataclass
class _PendingSave:
    tag_dir: Path
    step: int
    job: WriteJob
    pieces: list[list[Any]]  # [name, dim, offset, length, start, numel] of each piece this rank writes
    shapes: dict[str, list[int]]
    record: dict[str, Any] | None  # rank 0: the commit record without pieces and files
    blocked_s: float = 0.0


@dataclass
class StepOutcome:
    """What :meth:`Checkpointer.after_step` did."""

    scalars: list[dict[str, float]]  # ckpt/save_s, ckpt/write_s of this step, in the order measured
    stopped: str | None = None  # on a stop request, what was saved (for the log): the run exits now


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Checkpointer:
    """Saves, commits, finds and loads the checkpoints of one run.  Every rank calls every
    method except :meth:`close`, in the same order."""

    def __init__(self, run_dir: Path, cfg: Config, layout: ParallelLayout):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.opts, self.layout = cfg, cfg.train.checkpoint, layout
        self.rank = layout.rank
        self.tp_rank = layout.tp_rank
        self.pending: _PendingSave | None = None
        self.last_save: SaveTimes | None = None
        self._snapshot = HostSnapshot()
        self._pruner: threading.Thread | None = None

    def _layout(self) -> dict[str, int]:
        return {"world_size": self.layout.world_size, "dp": self.layout.dp, "tp": self.layout.tp,
                "ep": self.layout.ep, "zero_stage": self.cfg.train.zero_stage}

    # ------------------------------------------------------------------ once per step

    def after_step(self, engine, step: int, due: bool, trainer_state: Callable[[], dict[str, Any]],
                   stop_requested: bool, sigterm_age_s: float | None) -> StepOutcome:
        """The checkpointing of one optimizer step, on every rank at its end: one collective asks
        whether a rank wants to stop and whether a rank still writes the save in flight; that
        save is committed once every rank wrote it; on a stop request, what the grace time
        allows is saved (:meth:`plan_stop`) and ``stopped`` says what; else the save of
        ``step`` starts when ``due``.  ``trainer_state``: the trainer's part of a checkpoint
        (JSON, the same on every rank); ``sigterm_age_s``: seconds since this rank got SIGTERM."""
        outcome = StepOutcome([])
        stop, writing = self.poll(stop_requested)
        if self.pending is not None and not writing:
            outcome.scalars.append(self._commit_and_log())
        if stop:
            outcome.stopped = self._save_on_stop(engine, step, trainer_state, sigterm_age_s, outcome.scalars)
        elif due:
            outcome.scalars += self._save(engine, step, trainer_state())
        return outcome

    def poll(self, stop_requested: bool) -> tuple[bool, bool]:
        """(a rank wants to stop, a rank is still writing the save in flight): one collective."""
        stop, writing = sum_over_ranks([1.0 if stop_requested else 0.0, float(self.writing())], self.layout.device)
        return stop > 0, writing > 0

    def finish(self) -> list[dict[str, float]]:
        """Commit the save in flight, if any (at the end of a run, or before giving up on one)."""
        return [self._commit_and_log()] if self.pending is not None else []

    def _save(self, engine, step: int, trainer_state: dict[str, Any]) -> list[dict[str, float]]:
        """Start the save of ``step``, after committing the one in flight."""
        scalars = self.finish()
        scalars.append({"ckpt/save_s": self.save(engine, step, trainer_state)})
        return scalars

    def _commit_and_log(self) -> dict[str, float]:
        times = self.commit()
        if self.rank == 0:
            log.info("saved checkpoint step %d to %s: %.1f MB; the step loop waited %.2fs, the write took %.2fs "
                     "(%.0f MB/s)%s", times.step, self.dir, times.bytes / 1e6, times.blocked_s,
                     times.write_s, times.bytes / 1e6 / self.layout.world_size / max(times.write_s, 1e-9),
                     " in the background" if self.opts.async_save else "")
        return {"ckpt/write_s": times.write_s}

    def _save_on_stop(self, engine, step: int, trainer_state: Callable[[], dict[str, Any]],
                      sigterm_age_s: float | None, scalars: list[dict[str, float]]) -> str:
        """On a stop request: save what the grace time allows (see :func:`plan_stop`); returns
        what was done, for the log."""
        plan = self.plan_stop(step, sigterm_age_s)
        if self.rank == 0:
            log.info("stop: %s", plan.reason)
        pending = self.pending.step if self.pending is not None else None
        if plan.discard_pending:
            self.discard()
        elif plan.finish_pending:
            scalars.append(self._commit_and_log())
        if plan.save_now:
            scalars += self._save(engine, step, trainer_state())
            scalars.append(self._commit_and_log())
            return f"saved step {step}"
        if plan.finish_pending:
            return f"saved step {pending}"
        return f"kept the last committed checkpoint ({self.dir / LATEST})"

    # ------------------------------------------------------------------ save

    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> float:
        """Start the checkpoint of ``step``: copy this rank's state to host memory and write it
        (in the background with ``async_save``); :meth:`commit` makes it count.  Returns the
        seconds the caller waited.  ``trainer_state`` (JSON) is the same on every rank."""
        assert self.pending is None, "commit the save in flight first"
        start = time.perf_counter()
        self._join_pruner()
        tag_dir = self.dir / tag_for_step(step)
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():
                problem = validate_checkpoint(tag_dir)
                if problem is not None and (tag_dir / MANIFEST).exists():
                    self._set_aside(tag_dir, problem)
                else:  # an interrupted save, or an intact one of this step that this save redoes
                    _remove_tag(tag_dir)
        dist.barrier()
        model, optimizer = engine.module, engine.optimizer
        kinds = optimizer_state_keys(optimizer)
        host = self._snapshot.take(optimizer, kinds)
        pieces = local_pieces(model, self.tp_rank, writers_only=True)
        buffers = {n: b.detach().to("cpu", copy=True) for n, b in persistent_buffers(model).items()} if self.rank == 0 else {}
        rng, metadata = capture_rng_state()
        tensors = {**file_tensors(pieces, host, kinds, buffers), **rng}
        tag_dir.mkdir(parents=True, exist_ok=True)  # each rank: its view may not show rank 0's folder yet
        job = WriteJob(tag_dir / rank_file(self.rank), tensors, metadata, ready=self._snapshot.wait,
                       limit_bytes_per_s=self.opts.write_limit_mb_s * 1e6)
        record = None
        if self.rank == 0:
            record = {"format": 2, "step": step, "world_size": self.layout.world_size, "layout": self._layout(),
                      "config": self.cfg.model_dump(mode="json"), "trainer": trainer_state,
                      "optimizer": {"step": optimizer_step(optimizer), "states": kinds},
                      "buffers": {n: {"shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch."),
                                      "file": rank_file(0)} for n, b in buffers.items()}}
        self.pending = _PendingSave(
            tag_dir, step, job, [[p.name, *asdict(p.piece).values()] for p in pieces],
            {p.name: list(p.shape) for p in pieces}, record)
        if self.opts.async_save:
            job.start()
        else:
            job.run()
        self.pending.blocked_s = time.perf_counter() - start
        return self.pending.blocked_s

    def writing(self) -> bool:
        """Whether this rank's writer is still busy (local; no collective)."""
        return self.pending is not None and not self.pending.job.done()

    def commit(self) -> SaveTimes:
        """Wait for this rank's file, then commit the save in flight (see the module docstring).
        Raises :class:`CheckpointWriteError` on every rank when a rank could not write."""
        pending, self.pending = self.pending, None
        assert pending is not None
        pending.job.wait()
        job = pending.job
        report = {"file": None if job.report is None else asdict(job.report), "error": job.error,
                  "pieces": pending.pieces, "shapes": pending.shapes, "blocked_s": pending.blocked_s}
        reports = [None] * self.layout.world_size if self.rank == 0 else None
        commit_start = time.perf_counter()
        dist.gather_object(report, reports, dst=0)
        outcome = self._write_record(pending, reports, commit_start) if self.rank == 0 else None
        outcome = _broadcast(outcome)
        if "error" in outcome:
            raise CheckpointWriteError(f"checkpoint {pending.tag_dir} could not be written: {outcome['error']}. "
                                       f"The previous checkpoint is intact")
        self.last_save = SaveTimes(**outcome)
        if self.rank == 0:
            self._pruner = threading.Thread(target=self._prune, args=(pending.tag_dir,), name="checkpoint-pruner")
            self._pruner.start()
        return self.last_save

    def _write_record(self, pending: _PendingSave, reports: list[dict], commit_start: float) -> dict[str, Any]:
        errors = [f"rank {r}: {rep['error'] or 'nothing written'}" for r, rep in enumerate(reports) if rep["file"] is None]
        if errors:
            return {"error": "; ".join(errors)}
        params: dict[str, dict[str, Any]] = {}
        for rep in reports:
            for name, *where in rep["pieces"]:
                entry = params.setdefault(name, {"shape": rep["shapes"][name], "fragments": []})
                entry["fragments"].append([rep["file"]["name"], *where])
        holes = [n for n, e in params.items() if sum(f[-1] for f in e["fragments"]) != math.prod(e["shape"])]
        if holes:  # a bug, not a disk problem: never commit a checkpoint that cannot be loaded
            return {"error": f"the pieces written do not cover parameters {holes[:5]}"}
        files = {rep["file"]["name"]: {"bytes": rep["file"]["bytes"], "xxh3": rep["file"]["xxh3"]} for rep in reports}
        record = dict(pending.record, params=params, files=files)
        fsync_dir(self.dir)  # the tag folder's own entry
        _atomic_write_text(pending.tag_dir / MANIFEST, json.dumps(record, indent=1))
        _atomic_write_text(self.dir / LATEST, pending.tag_dir.name)
        return {"step": pending.step, "bytes": sum(f["bytes"] for f in files.values()),
                "blocked_s": max(rep["blocked_s"] for rep in reports),
                "write_s": max(rep["file"]["seconds"] for rep in reports),
                "commit_s": time.perf_counter() - commit_start}

    def discard(self) -> None:
        """Abort the save in flight on every rank and remove its folder (collective)."""
        pending, self.pending = self.pending, None
        assert pending is not None
        pending.job.abort()
        dist.barrier()
        if self.rank == 0:
            _remove_tag(pending.tag_dir)

    def close(self) -> None:
        """Local, for any exit: abort a save in flight (it never counted), wait for pruning."""
        if self.pending is not None:
            self.pending.job.abort()
            self.pending = None
        self._join_pruner()

    def plan_stop(self, step: int, sigterm_age_s: float | None) -> StopPlan:
        """Decide, on every rank alike, what a stop at ``step`` saves (see :func:`plan_stop`);
        ``sigterm_age_s``: seconds since this rank got SIGTERM (None: it did not)."""
        pending_s = 0.0
        if self.pending is not None:
            pending_s = self.pending.job.remaining_s()
            if pending_s is None:  # nothing written yet: as long as the last save's write, else unknown
                pending_s = self.last_save.write_s if self.last_save is not None else math.inf
        packed = torch.tensor([pending_s, -1.0 if sigterm_age_s is None else sigterm_age_s], dtype=torch.float64)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        pending_s, age = packed.tolist()
        budget = None if age < 0 else self.opts.grace_s - age - STOP_MARGIN_S
        if self.pending is not None and self.last_save is not None:
            pending_s += self.last_save.commit_s
        return plan_stop(step, budget, None if self.pending is None else self.pending.step, pending_s, self.last_save)

    # ------------------------------------------------------------------ pruning

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def _tags(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir()) if self.dir.is_dir() else []

    def _prune(self, keep: Path) -> None:
        """Rank 0, right after committing ``keep``: see the module docstring for what is kept."""
        try:
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
            for old in good[:-self.opts.keep_last]:
                _remove_tag(old)
        except OSError as exc:  # pruning again after the next commit may succeed; training goes on
            log.warning("could not prune old checkpoints in %s: %s", self.dir, exc)

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

    # ------------------------------------------------------------------ resume

    def _scan_sizes(self) -> tuple[list[Path], list[tuple[Path, str]], bool]:
        """Rank 0: the checkpoints whose files have their recorded sizes, newest first, never
        newer than ``latest``; the rejected ones; whether any was ever committed."""
        tags = self._tags()
        latest_file = self.dir / LATEST
        latest = latest_file.read_text().strip() if latest_file.is_file() else ""
        if re.fullmatch(r"step_\d{8}", latest):
            tags = [p for p in tags if p.name <= latest]
        candidates, rejected = [], []
        for tag_dir in reversed(tags):
            problem = validate_checkpoint(tag_dir)
            if problem is None:
                candidates.append(tag_dir)
            else:
                rejected.append((tag_dir, problem))
        committed = bool(latest) or any((p / MANIFEST).exists() for p in tags)
        return candidates, rejected, committed

    def _check_share(self, tag_dir: Path) -> str | None:
        """Hash this rank's share of ``tag_dir``'s files (file i goes to rank i mod world size:
        its own file when the layout is unchanged)."""
        try:
            record = self._read_record_visible(tag_dir)
            names = sorted(record["files"])
            for name in names[self.rank::self.layout.world_size]:
                problem = _file_problem(tag_dir / name, record["files"][name])
                if problem:
                    return problem
        except (OSError, ValueError) as exc:
            return f"rank {self.rank}: {exc}"
        return None

    @staticmethod
    def _read_record_visible(tag_dir: Path) -> dict[str, Any]:
        """The commit record rank 0 read, once this rank's view shows it."""
        deadline = time.monotonic() + VISIBILITY_TIMEOUT_S
        while True:
            try:
                return read_record(tag_dir)
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def choose_resume(self) -> CheckpointScan:
        """Pick the checkpoint every rank resumes from (collective; see the module docstring)."""
        candidates, rejected, committed = self._scan_sizes() if self.rank == 0 else ([], [], False)
        usable = None
        while True:
            candidate = _broadcast(candidates.pop(0) if candidates else None)
            if candidate is None:
                break
            problems: list[str | None] = [None] * self.layout.world_size
            dist.all_gather_object(problems, self._check_share(candidate))
            found = [p for p in problems if p]
            if not found:
                usable = candidate
                break
            rejected.append((candidate, found[0]))
        return _broadcast(CheckpointScan(usable, rejected, committed))

    def load(self, engine, tag_dir: Path) -> ResumePoint:
        """Load checkpoint ``tag_dir`` (from :meth:`choose_resume`) into ``engine``, whatever
        layout wrote it (collective)."""
        try:
            record = read_record(tag_dir)
            problem = check_same_parameters(engine.module, record)
            if problem:
                raise CheckpointError(f"checkpoint {tag_dir} does not fit this model: {problem}")
            with CheckpointReader(tag_dir, record) as reader:
                load_pieces(engine.module, engine.optimizer, reader)
        except CheckpointError:
            raise
        except Exception as exc:  # torch and safetensors raise many types for a damaged file
            raise CheckpointError(f"cannot load checkpoint {tag_dir}: {exc}") from None
        saved, mine = record["layout"], self._layout()
        same_ranks = all(saved[k] == mine[k] for k in ("world_size", "tp", "ep"))
        if same_ranks:
            restore_rng_state(tag_dir / rank_file(self.rank))
        resharded = None
        if saved != mine:
            def describe(lay: dict[str, int]) -> str:
                ranks = f"{lay['world_size']} rank" + ("s" if lay["world_size"] != 1 else "")
                return (f"{ranks} (dp {lay['dp']}, tp {lay['tp']}, ep {lay['ep']}, "
                        f"ZeRO-{lay['zero_stage']})")

            resharded = (f"resharded {tag_dir.name} from {describe(saved)} to {describe(mine)}: fp32 master weights, "
                         f"Adam moments and step ({record['optimizer']['step']}) and the balance biases, per "
                         f"parameter" + ("" if same_ranks else "; per-rank RNG states not restored (streams of another "
                                         "layout; they follow train.seed and the rank, and training draws none: loop "
                                         "counts follow the step, data order the sample position)"))
        return ResumePoint(tag=tag_dir.name, step=record["step"], trainer=record["trainer"], resharded=resharded)

"""``train.profile``: torch.profiler traces of chosen optimizer steps on chosen ranks.

Each profiled step is one Chrome/Perfetto trace, ``<run>/profile/rank_<r>/step_<s>.json``
(``chrome://tracing`` or https://ui.perfetto.dev).  With ``memory_snapshot`` on a GPU the caching
allocator records its history (every alloc and free with its stack) over the same steps;
``memory_snapshot.pickle`` is dumped after the last one, ``oom_memory_snapshot.pickle`` when one of
them runs out of memory (then the error goes on).  Both open in https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from mythos_scale.config import ConfigError, ProfileConfig
from mythos_scale.parallel import ParallelLayout

log = logging.getLogger("mythos_scale.train")

# Allocation events the allocator keeps in its history ring (torch's memory_viz guide: 100k).
MEMORY_HISTORY_ENTRIES = 100_000


class StepProfiler:
    """``with profiler.step(s):`` around optimizer step ``s`` profiles it when it is configured to."""

    def __init__(self, settings: ProfileConfig | None, out_dir: Path, layout: ParallelLayout):
        """Refuses (ConfigError, at start-up) a rank that is not in the world."""
        self.settings, self.device = settings, layout.device
        self.dir = out_dir / f"rank_{layout.rank:05d}"
        self.active = settings is not None and layout.rank in settings.ranks
        self.memory = self.active and settings.memory_snapshot and self.device.type == "cuda"
        if settings is None:
            return
        outside = [r for r in settings.ranks if r >= layout.world_size]
        if outside:
            raise ConfigError(f"train.profile.ranks: {outside} not in a world of {layout.world_size} rank(s)")
        if settings.memory_snapshot and self.device.type != "cuda" and layout.is_main:
            log.warning("train.profile.memory_snapshot records the CUDA allocator: nothing to record on %s",
                        self.device.type)

    def _profiled(self, step: int) -> bool:
        return self.active and self.settings.start_step <= step <= self.settings.end_step

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if not self._profiled(step):
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.memory and step == self.settings.start_step:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:
            with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
                yield
        except torch.cuda.OutOfMemoryError:
            if self.memory:
                self._dump_memory("oom_memory_snapshot.pickle")
            raise
        prof.export_chrome_trace(str(self.dir / f"step_{step:08d}.json"))
        if self.memory and step == self.settings.end_step:
            self._dump_memory("memory_snapshot.pickle")

    def _dump_memory(self, name: str) -> None:
        path = self.dir / name
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        log.warning("CUDA memory history written to %s (open it in https://pytorch.org/memory_viz)", path)

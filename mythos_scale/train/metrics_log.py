"""Where a run's metrics go: one :class:`MetricsLogger` in front of backends.

Every optimizer step gives one *row* (``train/*``, ``loops/*``, ``time/*``, ``model/*``, and on
logging steps ``perf/*``, ``mem/*``, ``val/*``); a step may add *scalars* between rows (the
checkpoint's ``ckpt/save_s``, ``ckpt/write_s``).  A backend is one class with ``row``,
``scalars`` and ``close``: :class:`JsonlHistory` (``metrics.jsonl``, one row per step, what
resume truncates and the plots read), :class:`TensorBoard` (``tb/``) and, with ``train.wandb``,
:class:`~mythos_scale.train.wandb_log.WandB`.  Only the main rank
has backends; every rank may call the logger.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mythos_scale.config import Config
from mythos_scale.train.metrics import format_count, format_duration

log = logging.getLogger("mythos_scale.train")


class MetricsBackend:
    """A destination of metrics.  ``row``: the one row of a step; ``scalars``: extra points."""

    def row(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Points that are not part of the step's row; by default the backend keeps rows only."""

    def close(self) -> None:
        pass


class JsonlHistory(MetricsBackend):
    """``metrics.jsonl``: one JSON line per step (its row and the wall time), flushed each step."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def row(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard(MetricsBackend):
    """TensorBoard event files in ``tb_dir``: every row and every extra scalar."""

    def __init__(self, tb_dir: Path, purge_step: int | None = None):
        """``purge_step``: on resume, the first step to be logged again; TensorBoard then hides
        what earlier event files hold for it and later steps."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step)

    def row(self, step: int, metrics: dict[str, float]) -> None:
        self.scalars(step, metrics)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MetricsLogger:
    """Sends each step's metrics to the backends and prints the console line (main rank)."""

    def __init__(self, backends: list[MetricsBackend], console: bool):
        self.backends, self.console = backends, console

    @classmethod
    def for_run(cls, run_dir: Path, main: bool, purge_step: int | None, cfg: Config) -> MetricsLogger:
        """The run's logger: ``tb/`` first (as before metrics.jsonl), then ``metrics.jsonl``, then
        W&B when ``train.wandb`` is set; none on other ranks than the main one."""
        if not main:
            return cls([], console=False)
        backends: list[MetricsBackend] = [TensorBoard(run_dir / "tb", purge_step), JsonlHistory(run_dir / "metrics.jsonl")]
        if cfg.train.wandb is not None:
            from mythos_scale.train.wandb_log import WandB

            backends.append(WandB(cfg, run_dir))
        return cls(backends, console=True)

    def row(self, step: int, max_steps: int, metrics: dict[str, float], console: bool) -> None:
        """The step's row to every backend; the console line on logging steps (``console``)."""
        for backend in self.backends:
            backend.row(step, metrics)
        if console and self.console:
            self._console(step, max_steps, metrics)

    def scalars(self, step: int, values: list[dict[str, float]]) -> None:
        for group in values:
            for backend in self.backends:
                backend.scalars(step, group)

    @staticmethod
    def _console(step: int, max_steps: int, m: dict[str, float]) -> None:
        """One line per logging interval: loss and T of its last step, throughput, ETA and memory
        over all of it (GPU: peak reserved, % of the device; CPU: resident, % of the machine)."""
        memory = (f"mem {m['mem/reserved_gib']:.1f} GiB ({m['mem/reserved_pct']:.0f}%)"
                  + (f", {int(m['mem/alloc_retries'])} alloc retries" if m["mem/alloc_retries"] else "")
                  if "mem/reserved_gib" in m else f"rss {m['mem/rss_gib']:.2f} GiB ({m['mem/rss_pct']:.0f}%)")
        log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | T %d | %.0f tok/s | MFU %.1f%% | %.2fs/step | "
                 "%s tok | ETA %s | %s%s",
                 step, max_steps, m["train/loss"], m["train/lr"], m["train/grad_norm"], m["loops/T"],
                 m["perf/tokens_per_s"], 100 * m["perf/mfu"], m["perf/step_s"], format_count(m["train/tokens_seen"]),
                 format_duration(m["perf/eta_s"]), memory,
                 (f" | val {m['val/loss']:.4f}" if "val/loss" in m else "")
                 + (f" | skipped {int(m['train/skipped_steps'])}" if m["train/skipped_steps"] else ""))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

"""Training metrics: throughput, MFU and memory (where they go: :mod:`.metrics_log`).

MFU = achieved model FLOP/s per device / peak FLOP/s per device.  Model FLOPs come from
the planner's count for the loop count actually run; the trainer averages them over each
logging interval's wall time.  The peak is ``train.peak_tflops`` when set, else a table of
dense bf16 peaks for known GPUs, else, on a CPU, the best fp32 matmul rate ever measured on
this CPU model with this many threads (see :func:`cpu_peak_tflops`): a figure the model cannot
exceed, where one matmul timed at start-up on a busy machine could be beaten by a later step.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import psutil
import torch
from filelock import FileLock

log = logging.getLogger("mythos_scale.train")

# Dense bf16 tensor-core peaks (TFLOP/s) per device, by name fragment.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def measure_cpu_matmul_tflops(size: int = 1024, repeats: int = 8) -> float:
    """fp32 matmul rate of this process's threads, from the fastest of ``repeats`` runs, each timed
    by the CPU time it used per thread: other processes competing for the cores stretch the wall
    clock, not the CPU time the work takes, so a busy machine does not lower the figure."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, (time.process_time() - start) / torch.get_num_threads())
    return 2 * size ** 3 / max(best, 1e-9) / 1e12


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_tflops(cache_dir: str | Path) -> float:
    """The best fp32 matmul rate measured on this CPU model with this many threads, now or by any
    earlier run: measured at each start, the best kept in ``<cache_dir>/cpu_peak_tflops.json``."""
    measured = measure_cpu_matmul_tflops()
    best, path = keep_cpu_peak(cache_dir, measured)
    log.info("MFU peak per rank: %.1f GFLOP/s, the best fp32 matmul measured on this CPU with %d "
             "thread(s) (%.1f now; kept in %s)", best * 1e3, torch.get_num_threads(), measured * 1e3, path)
    return best


def keep_cpu_peak(cache_dir: str | Path, tflops: float) -> tuple[float, Path]:
    """Record ``tflops`` as a rate this CPU (model, thread count, torch) has reached; returns the
    best rate kept so far and the file that keeps it."""
    key = f"{_cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    path = Path(cache_dir).expanduser() / "cpu_peak_tflops.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            kept = json.loads(path.read_text())
            kept = kept if isinstance(kept, dict) else {}
        except (OSError, ValueError):
            kept = {}
        best = max(tflops, float(kept.get(key, 0.0)))
        if best > float(kept.get(key, 0.0)):
            kept[key] = best
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(kept, indent=1) + "\n")
            os.replace(tmp, path)
    return best, path


def peak_tflops(configured: float, device: torch.device, cache_dir: str | Path) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in _GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return tflops
        log.warning("unknown GPU %r: set train.peak_tflops for a meaningful MFU", name)
        return float("nan")
    return cpu_peak_tflops(cache_dir)


GIB = 2 ** 30


def memory_metrics(device: torch.device) -> dict[str, float]:
    """``mem/*`` of the logging interval ending now.  CUDA: the peaks of allocated and reserved
    memory (and reserved as % of the device), the allocator's retries (a cudaMalloc that failed
    and was retried after freeing its cache: fragmentation, a step from an OOM) and OOMs, all
    since the previous call, whose counters are then reset.  CPU: this process's resident memory
    (and % of the machine's)."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.reset_accumulated_memory_stats(device)
        return cuda_memory_metrics(stats, total)
    rss = psutil.Process().memory_info().rss
    return {"mem/rss_gib": rss / GIB, "mem/rss_pct": 100 * rss / psutil.virtual_memory().total}


def cuda_memory_metrics(stats: dict[str, int], device_bytes: int) -> dict[str, float]:
    """``mem/*`` from ``torch.cuda.memory_stats`` (its keys) and the device's total memory."""
    reserved = stats.get("reserved_bytes.all.peak", 0)
    return {"mem/allocated_gib": stats.get("allocated_bytes.all.peak", 0) / GIB, "mem/reserved_gib": reserved / GIB,
            "mem/reserved_pct": 100 * reserved / device_bytes, "mem/alloc_retries": stats.get("num_alloc_retries", 0),
            "mem/ooms": stats.get("num_ooms", 0)}


def format_duration(seconds: float) -> str:
    """``2d03h``, ``1h02m``, ``3m05s``, ``12s``: an ETA on the console line."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    days, hours, minutes = s // 86400, s // 3600 % 24, s // 60 % 60
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s % 60:02d}s" if minutes else f"{s}s"


def format_count(n: float) -> str:
    """``950``, ``12.3K``, ``4.56M``, ``1.20B``, ``3.00T``: tokens seen on the console line."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


class ThroughputInterval:
    """The steps, wall time and model FLOPs since the last logging step (evaluation and
    checkpointing included): what ``perf/*`` is computed over."""

    def __init__(self) -> None:
        self.start, self.steps, self.flops = time.perf_counter(), 0, 0.0

    def add_step(self, flops: float) -> None:
        self.steps += 1
        self.flops += flops

    def take(self) -> tuple[int, float, float]:
        """(steps, seconds, FLOPs) of the interval ending now; a new one starts."""
        now = time.perf_counter()
        taken = (self.steps, now - self.start, self.flops)
        self.start, self.steps, self.flops = now, 0, 0.0
        return taken

"""Training metrics: TensorBoard on rank 0, a one-line console summary, throughput and MFU.

MFU = achieved model FLOP/s per device / peak FLOP/s per device.  Model FLOPs come from
the planner's count for the loop count actually run.  The peak is ``train.peak_tflops``
when set, else a table for known GPUs, else a matmul measured on this CPU at start-up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psutil
import torch

log = logging.getLogger("mythos_scale.train")

# Dense bf16 tensor-core peaks (TFLOP/s) per device, by name fragment.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def measure_cpu_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul throughput of this process's threads: the CPU roofline for MFU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = (time.perf_counter() - start) / repeats
    return 2 * size ** 3 / seconds / 1e12


def peak_tflops(configured: float, device: torch.device) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in _GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return tflops
        log.warning("unknown GPU %r: set train.peak_tflops for a meaningful MFU", name)
        return float("nan")
    return measure_cpu_matmul_tflops()


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return psutil.Process().memory_info().rss / 2 ** 30


class MetricsLogger:
    """Writes scalars to TensorBoard (main rank only) and prints the console line."""

    def __init__(self, tb_dir: Path | None):
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tb_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def console(self, step: int, max_steps: int, m: dict[str, float]) -> None:
        log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | T %d | %.0f tok/s | MFU %.1f%% | %.2fs/step%s",
                 step, max_steps, m["train/loss"], m["train/lr"], m["train/grad_norm"], m["loops/T"],
                 m["perf/tokens_per_s"], 100 * m["perf/mfu"], m["time/step_s"],
                 (f" | val {m['val/loss']:.4f}" if "val/loss" in m else "")
                 + (f" | skipped {int(m['train/skipped_steps'])}" if m["train/skipped_steps"] else ""))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

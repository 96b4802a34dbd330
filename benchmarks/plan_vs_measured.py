"""The planner's estimates against measurements of the real trainer on this machine's CPU.

    python benchmarks/plan_vs_measured.py memory [--quick] [--json out.json]
    python benchmarks/plan_vs_measured.py comm [--json out.json]

``memory``: for several (config, T, k, checkpointing, micro-batch, ZeRO stage) points, builds the
real :class:`~mythos_scale.train.trainer.Trainer` (DeepSpeed engine, fp32 on CPU, world of one)
and runs two optimizer steps (the second is the first with Adam's states), measuring

- the allocator peak: a ``TorchDispatchMode`` registers every tensor storage an op creates and
  drops it when the storage is freed (a weakref callback), so it counts live tensor bytes at
  every moment: the quantity ``torch.cuda.max_memory_allocated`` reports on a GPU, which is what
  the planner estimates.  Autograd's backward, DeepSpeed's buffers and gloo's outputs all go
  through the dispatcher and are seen;
- the RSS peak (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) above the RSS
  before the trainer was built, as a cross-check: it also holds Python objects and allocator
  slack, but not pages of a ``torch.empty`` buffer that were never written.

``comm``: starts 2 gloo ranks with the DeepSpeed launcher; each builds the real Trainer for
ZeRO-1 and ZeRO-2 (with gradient accumulation, several gradient buckets, and DeepSpeed's
reduce-to-owner path) and logs every collective the dispatcher executes during ``train_step``
(a ``TorchDispatchMode`` sees each ``c10d`` op: kind, group size, payload), whoever called it.
The bytes each rank puts on the wire follow from each call (ring algorithms: all-reduce
2 (n-1)/n, all-gather (n-1)/n of the gathered tensor); the rank's TCP bytes sent on its gloo
connections (``TCP_INFO``, the rendezvous store's left out) are read too: the bytes that really
crossed.  The same run measures each rank's peak memory (ZeRO's sharding over 2 ranks).

TP and EP: the planner models their collectives (``mythos_scale/plan/comms.py``).  When the
trainer gains them, a ``COMM_POINTS`` entry with ``parallel.tp=2`` / ``parallel.ep=2`` overrides
is all it takes: the log already records every kind (all-to-all included) with its group size,
and the comparison is per (kind, group size).

Each point prints measured and estimated figures; ``--json`` writes them for scripts
(``tests/test_plan_measured.py`` runs ``memory --quick`` and ``comm`` and checks the tolerances).
``memory --fresh`` runs each point in a process of its own so that its RSS peak means something.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STDLIB_FILES = ("argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "string.py", "shlex.py")
MIB = 2 ** 20

# A mid-size RDT: the 770M preset's structure (sandwich norm, MLA, 2 shared + top-k routed
# experts, LoRA on q/kv/o, z-loss) at CPU scale, ~12M parameters.
MID = ["model.vocab_size=8192", "model.dim=384", "model.n_heads=6", "model.prelude_layers=1",
       "model.core_layers=2", "model.coda_layers=1", "model.max_loops=8", "model.dense_ffn_hidden=1024",
       "model.lora_rank=8", "model.lora_targets=[q,kv,o]", "model.sandwich_norm=true",
       "model.attention.kv_lora_rank=96", "model.attention.qk_nope_head_dim=48",
       "model.attention.qk_rope_head_dim=16", "model.attention.v_head_dim=48",
       "model.moe.n_routed_experts=16", "model.moe.n_shared_experts=2", "model.moe.top_k=4",
       "model.moe.expert_hidden=128", "train.z_loss_coef=1e-4"]


@dataclass
class Point:
    name: str
    overrides: list[str]
    loops: int
    depth: int
    checkpointing: bool
    micro_batch: int
    grad_accum: int = 1
    zero_stage: int = 1
    bucket: int | None = None   # DeepSpeed reduce_bucket_size; None = its default (5e8 elements)
    quick: bool = True

    def config_overrides(self, world: int = 1) -> list[str]:
        out = [*self.overrides, "train.loops.sampler=fixed", f"train.loops.mean={self.loops}", "train.loops.min=1",
               f"train.loops.max={self.loops}", f"train.loops.backprop_depth={max(self.depth, 1)}",
               f"model.activation_checkpointing={str(self.checkpointing).lower()}",
               f"train.micro_batch_size={self.micro_batch}",
               f"train.global_batch_size={self.micro_batch * self.grad_accum * world}", f"train.zero_stage={self.zero_stage}"]
        if self.bucket is not None:
            out.append(f"deepspeed.zero_optimization.reduce_bucket_size={self.bucket}")
        return out


TINY = "configs/tiny_cpu.yaml"
# DeepSpeed's default bucket (5e8 elements) is 0.65x the 770M model; most points keep that
# ratio, the first ones keep the default (on CPU: a 2 GB fp32 bucket, the largest piece).
TINY_BUCKET, MID_BUCKET = 1_300_000, 8_000_000
MEMORY_POINTS = [
    Point("tiny main job", [], 3, 3, False, 8, quick=False),
    Point("tiny T3 k3 mb2", [], 3, 3, False, 2),
    Point("tiny ckpt T4 k2 mb2", [], 4, 2, True, 2, bucket=TINY_BUCKET),
    Point("tiny T2 k2 ga2 zero2", [], 2, 2, False, 1, grad_accum=2, zero_stage=2, bucket=TINY_BUCKET),
    Point("tiny ckpt T8 k8 zero2", [], 8, 8, True, 4, zero_stage=2, bucket=TINY_BUCKET, quick=False),
    Point("tiny T2 k1 mb16", [], 2, 1, False, 16, bucket=TINY_BUCKET, quick=False),
    Point("mid ckpt T3 k2 mb1", MID, 3, 2, True, 1, bucket=MID_BUCKET),
    Point("mid T2 k2 zero2", MID, 2, 2, False, 1, zero_stage=2, bucket=MID_BUCKET),
    Point("mid ckpt T6 k6 mb4", MID, 6, 6, True, 4, bucket=MID_BUCKET, quick=False),
    Point("mid T4 k3 ga2 mb2", MID, 4, 3, False, 2, grad_accum=2, bucket=MID_BUCKET, quick=False),
]

# 2 data-parallel ranks.  Buckets of 300k elements split tiny_cpu's 2M gradients into several
# reductions; the last point reduces each slice to its owner instead of all-reducing buckets, and
# switches ACT on (its 1-element bias makes DeepSpeed pad the flat buffers).
COMM_BUCKET = 300_000
COMM_POINTS = [
    Point("zero1 ga2", [], 2, 1, False, 1, grad_accum=2, zero_stage=1, bucket=COMM_BUCKET),
    Point("zero2 ga2", [], 2, 1, False, 1, grad_accum=2, zero_stage=2, bucket=COMM_BUCKET),
    Point("zero2 reduce-to-owner act", ["model.act.enabled=true",
                                        "deepspeed.zero_optimization.use_multi_rank_bucket_allreduce=false"],
          2, 1, False, 1, zero_stage=2, bucket=COMM_BUCKET),
]
SCALAR_BYTES = 64   # the trainer's and DeepSpeed's scalar all-reduces (losses, norms, flags): not modelled


# --------------------------------------------------------------------------- measuring tools


class LiveTensorBytes:
    """Live tensor bytes created by ops while active, and their peak (see the module doc)."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_map_only

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tree_map_only(torch.Tensor, tracker._track, out)
                return out

        self.mode = _Mode()
        self.live = self.peak = 0
        self._storages: dict[int, weakref.ref] = {}

    def _track(self, tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        if key in self._storages or nbytes == 0 or tensor.device.type == "meta":
            return
        self._storages[key] = weakref.ref(storage, lambda _ref, key=key, nbytes=nbytes: self._free(key, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, nbytes: int) -> None:
        if self._storages.pop(key, None) is not None:
            self.live -= nbytes

    def __enter__(self) -> LiveTensorBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


# c10d op -> (collective kind, index of the payload argument: "out" / "in" for the tensor or
# list of tensors to count).  Every torch.distributed call (DeepSpeed's, the trainer's)
# dispatches to one of these ops.
C10D_OPS = {
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "reduce_": ("reduce", 0), "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1), "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "broadcast_": ("broadcast", 0), "alltoall_base_": ("all_to_all", 1), "alltoall_": ("all_to_all", 1),
    "barrier": ("barrier", None),
}


def _tensor_bytes(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return value.numel() * value.element_size()


class CollectiveLog:
    """Logs every c10d collective dispatched while active: (kind, group size, payload bytes)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "c10d" and log.recording:
                    log._record(func._opname, args)
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()
        self.recording = False
        self.calls: list[dict[str, Any]] = []

    def _record(self, op: str, args) -> None:
        if op not in C10D_OPS:
            raise RuntimeError(f"unexpected collective c10d.{op}: teach C10D_OPS its payload")
        import torch
        from torch.distributed import ProcessGroup

        kind, index = C10D_OPS[op]
        group = next(ProcessGroup.unbox(a) for a in args
                     if isinstance(a, torch.ScriptObject) and str(a._type()).endswith("ProcessGroup"))
        self.calls.append({"op": op, "kind": kind, "group_size": group.size(),
                           "payload": 0 if index is None else _tensor_bytes(args[index])})

    @contextmanager
    def record(self) -> Iterator[list[dict[str, Any]]]:
        self.calls, self.recording = [], True
        try:
            yield self.calls
        finally:
            self.recording = False


def tcp_bytes_sent(exclude_port: int) -> int:
    """Bytes this process's TCP connections sent and had acknowledged (``tcpi_bytes_acked`` of
    ``TCP_INFO``), over every connection but those of the rendezvous store on ``exclude_port``."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.fromfd(int(fd), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        with sock:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
                ports = {sock.getsockname()[1], sock.getpeername()[1]}
            except OSError:   # not a connected TCP socket
                continue
        if exclude_port not in ports:
            total += struct.unpack_from("Q", info, 120)[0]   # struct tcp_info.tcpi_bytes_acked
    return total


# --------------------------------------------------------------------------- data


def prepare_data(root: Path, seq_len: int) -> Path:
    """MDS shards of ``seq_len`` from a few standard-library files (cached under ``root``)."""
    out = root / f"shards_{seq_len}"
    if (out / "manifest.json").exists():
        return out
    corpus, tokenizer = root / "corpus", root / "tokenizer.json"
    if not tokenizer.exists():
        corpus.mkdir(parents=True, exist_ok=True)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for name in STDLIB_FILES:
            (corpus / name.replace("/", "_")).write_text((stdlib / name).read_text())
        _run_data(["tokenizer", "--input", str(corpus), "--vocab-size", "512", "--out", str(tokenizer)])
    _run_data(["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--seq-len", str(seq_len),
               "--out", str(out), "--val-fraction", "0", "--workers", "1"])
    return out


def _run_data(argv: list[str]) -> None:
    from mythos_scale.data.data_cli import main as data_main

    if data_main(argv) != 0:
        raise RuntimeError(f"mythos data {' '.join(argv)} failed")


def _point_config(point: Point, data_root: Path, run_root: Path, world: int = 1):
    from mythos_scale.config import load_config

    probe = load_config(REPO / TINY, point.config_overrides(world))
    data = prepare_data(data_root, probe.data.seq_len)
    return load_config(REPO / TINY, [*point.config_overrides(world), f"data.sources=[{{path: '{data}'}}]",
                                     f"train.out_dir={run_root}", f"train.name={point.name.replace(' ', '_')}",
                                     "train.eval_every=0", "train.peak_tflops=1", "train.checkpoint.every=100000"])


def _plan_for(cfg, point: Point, world: int, fused_kernels: bool):
    from mythos_scale.plan.layout import Layout, Runtime

    tp, ep = cfg.parallel.tp, cfg.parallel.ep
    layout = Layout(dp=world // tp, tp=tp, ep=ep, zero_stage=point.zero_stage, micro_batch=point.micro_batch,
                    grad_accum=point.grad_accum, seq_len=cfg.data.seq_len, n_loops=point.loops,
                    backprop_depth=point.depth, checkpointing=point.checkpointing)
    return layout, Runtime.from_config(cfg, device="cpu", fused_kernels=fused_kernels)


# --------------------------------------------------------------------------- one point


def run_point(point: Point, data_root: Path, runs: Path, steps: int = 2,
              log: CollectiveLog | None = None) -> dict[str, Any]:
    """Build the real trainer for ``point`` in this process (one rank of its world) and run
    ``steps`` optimizer steps: the allocator peak over all of it (step 2 is the first with
    Adam's states), the live bytes before the last step (the model state), and with ``log``
    each step's collectives and TCP bytes sent."""
    import time

    import torch.distributed as dist

    from mythos_scale import kernels
    from mythos_scale.parallel import init_distributed
    from mythos_scale.train.trainer import Trainer, _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()   # as `mythos train` does on CPU: no minute-long build of an unused op
    layout = init_distributed()
    port = int(os.environ["MASTER_PORT"])

    def tcp_after_barrier() -> int:
        dist.barrier()
        time.sleep(0.05)   # let the last acknowledgements arrive
        return tcp_bytes_sent(port)

    cfg = _point_config(point, data_root, runs, layout.world_size)
    gc.collect()
    rss_before = _status_bytes("VmRSS")
    _reset_rss_peak()
    measured_steps = []
    with LiveTensorBytes() as live:
        trainer = Trainer(cfg, layout)
        batches = iter(trainer.train_loader)
        barrier_bytes = -tcp_after_barrier() + tcp_after_barrier() if log else 0
        for _ in range(steps):
            static = live.live
            if log is None:
                trainer.train_step(batches)
                continue
            before = tcp_after_barrier()
            with log.record() as calls:
                trainer.train_step(batches)
            measured_steps.append({"calls": calls, "tcp_sent": tcp_after_barrier() - before - barrier_bytes})
    zero = trainer.engine.optimizer
    padding = sum(flat.numel() * flat.element_size() for flat in zero.bit16_groups_flat) - sum(
        p.numel() * p.element_size() for group in zero.bit16_groups for p in group)
    result = {"point": point.name, "rank": layout.rank, "world": layout.world_size,
              "fused_kernels": trainer.model.kernels.implementation(layout.device.type) is not kernels.reference,
              "measured_peak": live.peak, "measured_static": static,
              "measured_rss_peak": _status_bytes("VmHWM") - rss_before,
              "allgather_padding_bytes": padding, "steps": measured_steps}
    del trainer, batches, zero
    gc.collect()
    return result


def _estimate_memory(point: Point, measured: dict[str, Any]) -> dict[str, Any]:
    from mythos_scale.config import load_config
    from mythos_scale.plan.memory import estimate_memory

    cfg = load_config(REPO / TINY, point.config_overrides(measured["world"]))
    layout, runtime = _plan_for(cfg, point, measured["world"], measured["fused_kernels"])
    est = estimate_memory(cfg.model, layout, runtime)
    row = {**{k: v for k, v in measured.items() if k != "steps"}, "layout": layout.as_dict(),
           "estimated_peak": est.peak, "estimated_static": est.static_total,
           "estimated_moment": est.peak_moment, "estimated_moments": est.peaks,
           "peak_error": est.peak / measured["measured_peak"] - 1}
    rss = f"{row['measured_rss_peak'] / MIB:8.1f}" if "rss_trusted" in measured else "       -"
    print(f"{point.name:<26} r{row['rank']}  measured {row['measured_peak'] / MIB:8.1f} MiB  rss {rss}  "
          f"estimated {est.peak / MIB:8.1f} MiB  {100 * row['peak_error']:+5.1f}%  at the "
          f"{est.peak_moment.replace('_', ' '):<18} model state {row['measured_static'] / MIB:6.1f} / "
          f"{est.static_total / MIB:6.1f} MiB", flush=True)
    return row


# --------------------------------------------------------------------------- memory


def measure_memory(points: list[Point], data_root: Path, fresh: bool) -> list[dict[str, Any]]:
    """Each point in this process, or with ``fresh`` in a process of its own whose glibc hands
    freed memory back at once (``MALLOC_MMAP_THRESHOLD_``), so that its RSS peak means something."""
    rows = []
    for point in points:
        prepare_data(data_root, _seq_len(point))
        if not fresh:
            with tempfile.TemporaryDirectory() as runs:
                rows.append(_estimate_memory(point, run_point(point, data_root, Path(runs))))
            continue
        with tempfile.TemporaryDirectory() as out:
            _run_worker([sys.executable, str(Path(__file__).resolve())], "memory", [point], data_root,
                        Path(out), {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
            measured = json.loads((Path(out) / "rank0.json").read_text())[0]
        rows.append(_estimate_memory(point, {**measured, "rss_trusted": True}))
    return rows


# --------------------------------------------------------------------------- communication


def _by_kind(collectives: list[dict[str, Any]]) -> dict[str, float]:
    """Payload bytes per "kind/group size"."""
    out: dict[str, float] = {}
    for c in collectives:
        key = f"{c['kind']}/{c['group_size']}"
        out[key] = out.get(key, 0) + c["payload"]
    return out


def _unmodelled(call: dict[str, Any]) -> bool:
    """The scalar all-reduces of the trainer and DeepSpeed (losses, norms, flags) and barriers."""
    return call["kind"] == "barrier" or (call["kind"] == "all_reduce" and call["payload"] <= SCALAR_BYTES)


def measure_comm(points: list[Point], data_root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """2 ranks under the DeepSpeed launcher; returns (communication rows, memory rows) per rank."""
    from mythos_scale.config import load_config
    from mythos_scale.plan.comms import WIRE_FACTOR, communication

    for point in points:
        prepare_data(data_root, _seq_len(point))
    with tempfile.TemporaryDirectory() as out, socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        launcher = ["deepspeed", "--num_gpus", "2", "--no_local_rank", "--master_port", str(port),
                    str(Path(__file__).resolve())]
        _run_worker(launcher, "comm", points, data_root, Path(out), {"OMP_NUM_THREADS": "1"})
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]

    comm_rows, memory_rows = [], []
    for i, point in enumerate(points):
        cfg = load_config(REPO / TINY, point.config_overrides(2))
        layout, runtime = _plan_for(cfg, point, 2, fused_kernels=False)
        planned = [c.as_dict() for calls in communication(cfg.model, layout, runtime).values() for c in calls]
        planned_by_kind = _by_kind([{"kind": c["kind"], "group_size": c["group_size"],
                                     "payload": c["payload_bytes"] * c["calls_per_step"]} for c in planned])
        for measured in (rank[i] for rank in ranks):
            memory_rows.append(_estimate_memory(point, measured))
            step = measured["steps"][-1]
            modelled = [c for c in step["calls"] if not _unmodelled(c)]
            ring = sum(WIRE_FACTOR[c["kind"]](c["group_size"]) * c["payload"]
                       for c in step["calls"] if c["kind"] in WIRE_FACTOR)
            row = {
                "point": point.name, "rank": measured["rank"], "layout": layout.as_dict(), "planned": planned,
                "planned_payload_by_kind": planned_by_kind, "measured_payload_by_kind": _by_kind(modelled),
                "steps_identical": all(s["calls"] == step["calls"] for s in measured["steps"]),
                "allgather_padding_bytes": measured["allgather_padding_bytes"],
                "unmodelled_calls": [c for c in step["calls"] if _unmodelled(c)],
                "planned_wire_bytes": sum(c["wire_bytes_per_step"] for c in planned),
                "ring_wire_bytes": ring, "tcp_sent_bytes": step["tcp_sent"],
                "only_ring_algorithms": all(c["kind"] in ("all_reduce", "all_gather", "barrier")
                                            for c in step["calls"]),
            }
            comm_rows.append(row)
            print(f"{point.name:<26} r{row['rank']}  payload planned {_fmt_kinds(planned_by_kind)}  measured "
                  f"{_fmt_kinds(row['measured_payload_by_kind'])} (+{row['allgather_padding_bytes']} B padding, "
                  f"{len(row['unmodelled_calls'])} scalar calls)  sent: planned {row['planned_wire_bytes']:,.0f} B, "
                  f"ring over the logged calls {ring:,.0f} B, TCP {step['tcp_sent']:,} B", flush=True)
    return comm_rows, memory_rows


def _fmt_kinds(by_kind: dict[str, float]) -> str:
    return ", ".join(f"{kind} {value:,.0f}" for kind, value in sorted(by_kind.items()))


def _seq_len(point: Point) -> int:
    from mythos_scale.config import load_config

    return load_config(REPO / TINY, point.config_overrides()).data.seq_len


def _run_worker(launcher: list[str], what: str, points: list[Point], data_root: Path, out: Path,
                env: dict[str, str]) -> None:
    cmd = [*launcher, "worker", what, "--data-dir", str(data_root), "--out", str(out),
           "--points", json.dumps([p.name for p in points])]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")


def worker(what: str, names: list[str], data_root: Path, out: Path) -> None:
    """One rank: run the named points, write what it measured to ``out/rank<r>.json``."""
    import torch.distributed as dist

    from mythos_scale.parallel import init_distributed
    from mythos_scale.train.trainer import _skip_deepspeed_shm_op

    points = [p for p in (MEMORY_POINTS if what == "memory" else COMM_POINTS) if p.name in names]
    log = CollectiveLog() if what == "comm" else None
    if log is not None:
        log.mode.__enter__()
    _skip_deepspeed_shm_op()
    rank = init_distributed().rank
    with tempfile.TemporaryDirectory() as runs:
        results = [run_point(p, data_root, Path(runs), log=log) for p in points]
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("memory", "comm"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--data-dir", help="where to prepare the shards (default: a temporary folder)")
        cmd.add_argument("--json", help="write the rows to this file")
    sub.choices["memory"].add_argument("--quick", action="store_true", help="only the points the tests run")
    sub.choices["memory"].add_argument("--fresh", action="store_true",
                                       help="one process per point, so that the RSS peak can be trusted")
    work = sub.add_parser("worker")   # internal: one rank of a measurement
    work.add_argument("kind", choices=["memory", "comm"])
    work.add_argument("--data-dir", required=True)
    work.add_argument("--out", required=True)
    work.add_argument("--points", required=True)
    args = parser.parse_args()
    if args.what == "worker":
        worker(args.kind, json.loads(args.points), Path(args.data_dir), Path(args.out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(args.data_dir) if args.data_dir else Path(tmp)
        if args.what == "memory":
            rows: Any = measure_memory([p for p in MEMORY_POINTS if p.quick or not args.quick], data_root, args.fresh)
        else:
            comm, memory = measure_comm(COMM_POINTS, data_root)
            rows = {"communication": comm, "memory": memory}
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

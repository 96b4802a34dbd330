"""Checkpoint save time, synchronous against asynchronous, and the writer's rate against the disk's.

    python benchmarks/bench_checkpoint.py [--dir /tmp/bench_checkpoint] [--rounds 3] [--json out.json]

One process with a real DeepSpeed ZeRO-1 engine (fp32 on CPU) of a ~58M-parameter RDT: its
checkpoint (fp32 master weights and Adam's two moments, ~0.7 GB in one file) is what one rank of
the 770M config writes at DP=8 (~1.1 GB).  Each round, one after the other in this process:

- disk: as many bytes written with ``os.write`` in 16 MiB chunks, then fsync: the disk's rate;
- sync: ``save`` + ``commit`` with ``async_save=false``: what the step loop waits for without
  the background writer;
- async: ``save`` (the step loop waits for the copy to host memory), then training steps until
  the writer is done, then ``commit``; those steps are timed against steps without a write.

Printed (medians over rounds): the sync save; the async wait (copy + commit); the share of the
sync save the step loop no longer waits for; the slowdown of the steps that ran during the
write (the writer's thread competes for CPU: on a GPU node the step runs on the GPU, here on the
same 2 cores); the writer's bytes/s against the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

MODEL = ["model.vocab_size=32768", "model.dim=512", "model.n_heads=8", "model.prelude_layers=2",
         "model.core_layers=2", "model.coda_layers=2", "model.dense_ffn_hidden=1536", "model.moe.expert_hidden=512",
         "model.moe.n_routed_experts=16", "model.attention.kv_lora_rank=128", "model.attention.q_lora_rank=192",
         "model.attention.qk_nope_head_dim=64", "model.attention.qk_rope_head_dim=32", "model.attention.v_head_dim=64",
         "model.max_seq_len=128", "data.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=2",
         "train.loops.sampler=fixed", "train.loops.mean=2", "train.loops.min=2", "train.loops.max=2",
         "train.loops.backprop_depth=2"]


def disk_write(path: Path, size: int) -> float:
    """Seconds to write ``size`` bytes to a new file in 16 MiB chunks, then fsync it."""
    chunk = os.urandom(16 << 20)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, chunk[:min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/bench_checkpoint", help="where to write (emptied first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dim=768")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from mythos_scale.train.trainer import _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()
    import deepspeed

    from mythos_scale.config import load_config
    from mythos_scale.model import build_model
    from mythos_scale.parallel import init_distributed
    from mythos_scale.train.checkpoint import Checkpointer
    from mythos_scale.train.optim import build_optimizer
    from mythos_scale.train.trainer import deepspeed_config

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    configs = {mode: load_config("configs/tiny_cpu.yaml", [*MODEL, f"train.checkpoint.async_save={mode == 'async'}",
                                                            *args.overrides]) for mode in ("sync", "async")}
    cfg = configs["async"]
    layout = init_distributed()
    torch.set_num_threads(args.threads)
    model = build_model(cfg.model, seed=0)
    params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train),
                                      config=deepspeed_config(cfg, layout))
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))

    def train_step() -> float:
        start = time.perf_counter()
        out = engine(tokens[:, :-1], n_loops=2, backprop_depth=2)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up; Adam's state exists from here on
        train_step()
    savers = {mode: Checkpointer(root / mode, configs[mode], layout) for mode in configs}
    rows = []
    for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
        step = 10 * (r + 1)
        start = time.perf_counter()
        savers["sync"].save(engine, step, {})
        sync = savers["sync"].commit()
        sync_s = time.perf_counter() - start
        disk_s = disk_write(root / "disk_probe", sync.bytes)

        quiet = [train_step() for _ in range(2)]
        start = time.perf_counter()
        waited = savers["async"].save(engine, step, {})
        during = []
        while savers["async"].writing():
            during.append(train_step())
        commit_start = time.perf_counter()
        times = savers["async"].commit()
        commit_s = time.perf_counter() - commit_start
        rows.append({"bytes": sync.bytes, "sync_s": sync_s, "sync_write_s": sync.write_s, "disk_s": disk_s,
                     "async_wait_s": waited + commit_s, "async_write_s": times.write_s,
                     "async_wall_s": time.perf_counter() - start, "steps_during_write": len(during),
                     "step_s_quiet": statistics.mean(quiet),
                     "step_s_during_write": statistics.mean(during) if during else float("nan")})
    for saver in savers.values():
        saver.close()

    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    hidden = 1 - med["async_wait_s"] / med["sync_s"]
    disk_rate, write_rate = med["bytes"] / med["disk_s"], med["bytes"] / med["async_write_s"]
    slowdown = med["step_s_during_write"] / med["step_s_quiet"] - 1
    print(f"model {params / 1e6:.1f}M parameters, checkpoint {med['bytes'] / 1e9:.2f} GB (fp32 master + Adam "
          f"moments), {args.rounds} rounds, medians; {args.threads} threads; writing to {root}")
    print(f"  disk (os.write + fsync):           {med['disk_s']:6.2f} s   {disk_rate / 1e6:7.0f} MB/s")
    print(f"  sync save (step loop waits):       {med['sync_s']:6.2f} s   writer {med['bytes'] / med['sync_write_s'] / 1e6:7.0f} MB/s")
    print(f"  async save, step loop waits:       {med['async_wait_s']:6.2f} s   (host copy + commit)")
    print(f"  async write in the background:     {med['async_write_s']:6.2f} s   writer {write_rate / 1e6:7.0f} MB/s "
          f"= {write_rate / disk_rate:.0%} of the disk's")
    print(f"  hidden from the step loop:         {hidden:6.1%} of the sync save")
    print(f"  steps during the write:            {med['steps_during_write']:.0f}, {med['step_s_during_write']:.2f} s "
          f"each against {med['step_s_quiet']:.2f} s without ({slowdown:+.0%}: the writer's CPU share)")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "rounds": rows, "median": med,
                                               "hidden_share": hidden, "disk_bytes_per_s": disk_rate,
                                               "writer_bytes_per_s": write_rate}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

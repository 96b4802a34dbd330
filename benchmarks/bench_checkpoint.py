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

Then resharding (``--reshard-from 2 --reshard-to 1 2 4``): gloo ranks of the same model take a
step and save at ZeRO-1 on 2 ranks; fresh engines on 1, 2 and 4 ranks load that checkpoint.
Printed per target: the load time (slowest rank; each rank reads only the byte ranges of the
pieces it needs), the bytes each rank reads, and whether the loaded master weights equal the
saved ones (read back with ``read_model_state``).
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
import torch.multiprocessing as mp
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


def _engine(cfg):
    """A DeepSpeed engine of ``cfg``'s model in this process's layout (the trainer's own pass)."""
    from mythos_scale.model import build_model
    from mythos_scale.parallel import init_distributed
    from mythos_scale.parallel.parallelize import parallelize
    from mythos_scale.train.optim import build_optimizer

    layout = init_distributed()
    model = build_model(cfg.model, seed=0)
    return parallelize(model, cfg, layout, lambda m: build_optimizer(m, cfg.train)), layout


def _train_step(engine, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    out = engine(tokens[:, :-1], n_loops=2, backprop_depth=2)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start


def _tokens(cfg) -> torch.Tensor:
    return torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                         generator=torch.Generator().manual_seed(0))


def _reshard_rank(rank: int, world: int, port: int, overrides: list[str], folder: str, save: bool, out: str) -> None:
    """One gloo rank: take a step and save (``save``), or load the saved checkpoint; writes its times."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mythos_scale.train.trainer import _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()
    import torch.distributed as dist

    from mythos_scale.checkpoint import Checkpointer
    from mythos_scale.config import load_config

    cfg = load_config("configs/tiny_cpu.yaml", [*MODEL, f"train.global_batch_size={2 * world}",
                                                "train.micro_batch_size=2", "train.checkpoint.async_save=false",
                                                *overrides])
    engine, layout = _engine(cfg)
    saver = Checkpointer(Path(folder) / ("from" if save else f"to{world}"), cfg, layout)
    if save:
        _train_step(engine, _tokens(cfg))
        saver.save(engine, 1, {})
        saver.commit()
        result = {}
    else:
        dist.barrier()
        start = time.perf_counter()
        point = saver.load(engine, Path(folder) / "from" / "checkpoints" / "step_00000001")
        result = {"load_s": time.perf_counter() - start, "resharded": point.resharded is not None,
                  "state": {n: p.detach().clone() for n, p in engine.module.named_parameters()} if rank == 0 else {}}
    saver.close()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def reshard(source: int, targets: list[int], overrides: list[str], root: Path) -> list[dict]:
    """Save on ``source`` ranks, load on each of ``targets``; the figures per target."""
    import socket

    from mythos_scale.checkpoint import read_checkpoint_info, read_model_state

    def launch(world: int, save: bool) -> list[dict]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = root / f"results{world}{'s' if save else ''}"
        out.mkdir(parents=True)
        mp.start_processes(_reshard_rank, args=(world, port, overrides, str(root), save, str(out)), nprocs=world,
                           start_method="spawn")
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]

    launch(source, save=True)
    tag = root / "from" / "checkpoints" / "step_00000001"
    info, saved = read_checkpoint_info(tag), read_model_state(tag)
    figures = []
    for world in tqdm(targets, desc="resharding", unit="layout"):
        results = launch(world, save=False)
        state = results[0]["state"]
        exact = all(torch.equal(state[n], saved[n]) for n in state)  # ZeRO-1/2 without TP: whole weights
        figures.append({"from_ranks": source, "to_ranks": world, "bytes": info["bytes"],
                        "bytes_read_per_rank": info["bytes"] / world,
                        "load_s": max(r["load_s"] for r in results), "resharded": results[0]["resharded"],
                        "weights_equal": exact})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/bench_checkpoint", help="where to write (emptied first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--reshard-from", type=int, default=2, help="ranks that save (0: skip resharding)")
    parser.add_argument("--reshard-to", type=int, nargs="*", default=[1, 2, 4], help="ranks that load")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dim=768")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from mythos_scale.train.trainer import _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()
    from mythos_scale.checkpoint import Checkpointer
    from mythos_scale.config import load_config

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    configs = {mode: load_config("configs/tiny_cpu.yaml", [*MODEL, f"train.checkpoint.async_save={mode == 'async'}",
                                                            *args.overrides]) for mode in ("sync", "async")}
    cfg = configs["async"]
    engine, layout = _engine(cfg)
    torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in engine.module.parameters())
    tokens = _tokens(cfg)

    def train_step() -> float:
        return _train_step(engine, tokens)

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
    sync_rate = med['bytes'] / med['sync_write_s'] / 1e6
    print(f"  sync save (step loop waits):       {med['sync_s']:6.2f} s   writer {sync_rate:7.0f} MB/s")
    print(f"  async save, step loop waits:       {med['async_wait_s']:6.2f} s   (host copy + commit)")
    print(f"  async write in the background:     {med['async_write_s']:6.2f} s   writer {write_rate / 1e6:7.0f} MB/s "
          f"= {write_rate / disk_rate:.0%} of the disk's")
    print(f"  hidden from the step loop:         {hidden:6.1%} of the sync save")
    print(f"  steps during the write:            {med['steps_during_write']:.0f}, {med['step_s_during_write']:.2f} s "
          f"each against {med['step_s_quiet']:.2f} s without ({slowdown:+.0%}: the writer's CPU share)")
    engine.destroy()
    import torch.distributed as dist

    dist.destroy_process_group()

    resharding = reshard(args.reshard_from, args.reshard_to, args.overrides, root / "reshard") if args.reshard_from else []
    for row in resharding:
        check = ", weights equal the saved ones" if row["weights_equal"] else ", WEIGHTS DIFFER from the saved ones"
        print(f"  load {row['from_ranks']} ranks -> {row['to_ranks']}:            {row['load_s']:6.2f} s   "
              f"{row['bytes_read_per_rank'] / 1e6:7.0f} MB read per rank (mean)"
              f"{' (resharded)' if row['resharded'] else ' (same layout)'}{check}")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "rounds": rows, "median": med,
                                               "hidden_share": hidden, "disk_bytes_per_s": disk_rate,
                                               "writer_bytes_per_s": write_rate, "resharding": resharding}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

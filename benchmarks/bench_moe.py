"""One MoE layer's forward+backward: grouped-GEMM experts vs the per-expert loop, and EP=N vs EP=1.

    python benchmarks/bench_moe.py [--dim 1536 --hidden 480 --experts 16 --top-k 6 --tokens 1024]
                                   [--ep 2] [--json out.json]

The defaults are the 770M config's core MoE dims with 16 of its 64 experts (all 64 would need
~12 GiB for the loop's zero-filled gradients alone, in fp32).

1. Grouped GEMM vs loop (one process, ``--threads``): "loop" is how the layer ran its experts
   before the grouped GEMM: ``F.linear`` over ``w[e]`` of the stacked weights, one expert at a
   time (each ``w[e]``'s backward, ``select_backward``, allocates a zero-filled gradient the size
   of the whole stacked weight), and the outputs combined by ``index_add``.
2. Expert parallelism (``--ep`` gloo ranks on this machine, ``--threads / ep`` threads each):
   every rank routes its own ``--tokens`` tokens through the same layer, either holding all
   experts (EP=1, no communication) or its E/ep of them with the all-to-all dispatch of
   :mod:`mythos_scale.parallel.ep` (EP=ep).  Printed per rank: the layer's fwd+bwd time (the
   slowest rank's median), the expert weights held, and the bytes the all-to-alls moved to
   other ranks in one fwd+bwd (counted at torch's all-to-all op, forward and backward).  On CPU the
   ranks share the cores and gloo goes through loopback TCP: the time ratio says what the
   dispatch costs here, not on NVLink; the bytes are what a GPU run moves too.

Variants are timed alternately in one process (median of ``--steps``); bytes allocated during
one forward+backward come from torch.profiler's memory events.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from mythos_scale.config import config_from_dict
from mythos_scale.model import MoE
from mythos_scale.parallel.ep import shard_experts


def loop_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer as it ran before: experts in a Python loop over ``w[e]``, index_add combine."""
    flat = x.reshape(-1, x.shape[-1])
    _, chosen, gates = layer.route(flat, 0)
    order = torch.argsort(chosen.flatten(), stable=True)
    token = order // layer.top_k
    counts = torch.bincount(chosen.flatten(), minlength=layer.n_experts).tolist()
    e = layer.experts
    outputs = [F.linear(e.kernels.swiglu(F.linear(rows, e.w_gate[i]), F.linear(rows, e.w_up[i])), e.w_down[i])
               for i, rows in enumerate(flat.index_select(0, token).split(counts)) if rows.shape[0]]
    weighted = torch.cat(outputs) * gates.flatten()[order].unsqueeze(-1)
    y = flat.new_zeros(flat.shape).index_add(0, token, weighted)
    return y.view_as(x)  # no shared expert in this benchmark


def grouped_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    return layer(x, 0)[0]


def build_layer(args: argparse.Namespace) -> MoE:
    cfg = config_from_dict({"model": {"dim": args.dim, "kernels": "reference", "moe": {
        "n_routed_experts": args.experts, "top_k": args.top_k, "expert_hidden": args.hidden,
        "n_shared_experts": 0}}}).model
    layer = MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return layer


def time_variants(variants: dict, step, steps: int) -> dict[str, float]:
    """Median seconds of ``step(variant)`` per variant, alternating, after one warm-up each."""
    for variant in variants.values():
        step(variant)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(steps):
        for name, variant in variants.items():
            start = time.perf_counter()
            step(variant)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def allocated_bytes(step) -> tuple[int, int]:
    """Bytes allocated during one ``step()`` (all, and by select_backward) per torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.events() if e.cpu_memory_usage > 0]
    return (sum(e.cpu_memory_usage for e in events),
            sum(e.cpu_memory_usage for e in events if e.name == "aten::select_backward"))


def grouped_vs_loop(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    layer = build_layer(args)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.tokens, args.dim, generator=gen)
    grad = torch.randn(1, args.tokens, args.dim, generator=gen)
    variants = {"loop": loop_forward, "grouped": grouped_forward}

    def step(forward) -> None:
        forward(layer, x.clone().requires_grad_()).backward(grad)
        layer.zero_grad(set_to_none=True)

    medians = time_variants(variants, step, args.steps)
    result = {}
    for name, forward in variants.items():
        allocated, zero_fill = allocated_bytes(lambda: step(forward))
        result[name] = {"median_s": medians[name], "allocated_gib": allocated / 2 ** 30,
                        "select_backward_gib": zero_fill / 2 ** 30}
        print(f"{name:>8}: {medians[name] * 1e3:8.1f} ms fwd+bwd | {allocated / 2 ** 30:6.2f} GiB allocated "
              f"({zero_fill / 2 ** 30:.2f} GiB by select_backward)")
    result["speedup"] = medians["loop"] / medians["grouped"]
    print(f"grouped GEMM: {result['speedup']:.2f}x the loop ({args.tokens} tokens, d{args.dim}, {args.experts} "
          f"experts x {args.hidden}, top-{args.top_k}, fp32, {args.threads} threads)")
    return result


class CountingAllToAll(TorchDispatchMode):
    """Adds up the bytes each all-to-all (forward and backward) sends to other ranks."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.bytes = rank, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            tensor, _, input_split_sizes, _ = args
            row_bytes = tensor[:1].nbytes if tensor.ndim > 1 else tensor.element_size()
            self.bytes += sum(n for j, n in enumerate(input_split_sizes) if j != self.rank) * row_bytes
        return func(*args, **(kwargs or {}))


def ep_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One rank of the EP comparison: the full layer (EP=1) and its expert-parallel copy (EP=world)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, args.threads // world))
    full = build_layer(args)
    sharded = copy.deepcopy(full)
    shard_experts(sharded, rank, world, dist.group.WORLD)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens, as in training
    x = torch.randn(1, args.tokens, args.dim, generator=gen)
    grad = torch.randn(1, args.tokens, args.dim, generator=gen)
    all_to_all = CountingAllToAll(rank)
    layers = {"ep1": full, f"ep{world}": sharded}

    def step(layer: MoE) -> None:
        layer(x.clone().requires_grad_(), 0)[0].backward(grad)
        layer.zero_grad(set_to_none=True)
        dist.barrier()  # a step ends when every rank's has

    medians = time_variants(layers, step, args.steps)
    rows = {}
    for name, layer in layers.items():
        allocated, _ = allocated_bytes(lambda: step(layer))
        all_to_all.bytes = 0
        with all_to_all:
            step(layer)
        rows[name] = {"median_s": medians[name], "bytes_moved": all_to_all.bytes, "allocated_bytes": allocated,
                      "expert_weight_bytes": sum(p.nbytes for p in layer.experts.parameters())}
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def expert_parallel(args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ep.json")
        mp.start_processes(ep_rank, args=(args.ep, port, args, out), nprocs=args.ep, start_method="spawn")
        with open(out) as f:
            ranks = json.load(f)
    result = {}
    for name in ranks[0]:
        result[name] = {"median_s": max(r[name]["median_s"] for r in ranks),
                        **{k: max(r[name][k] for r in ranks) for k in ("bytes_moved", "allocated_bytes",
                                                                          "expert_weight_bytes")}}
        row = result[name]
        print(f"{name:>8}: {row['median_s'] * 1e3:8.1f} ms fwd+bwd per rank | expert weights "
              f"{row['expert_weight_bytes'] / 2 ** 20:7.1f} MiB per rank | all-to-all "
              f"{row['bytes_moved'] / 2 ** 20:7.2f} MiB to other ranks | {row['allocated_bytes'] / 2 ** 30:5.2f} GiB "
              f"allocated")
    base, ep = result["ep1"], result[f"ep{args.ep}"]
    result["time_ratio"] = ep["median_s"] / base["median_s"]
    weight_ratio = ep['expert_weight_bytes'] / base['expert_weight_bytes']
    print(f"EP={args.ep}: {result['time_ratio']:.2f}x the time of EP=1, {weight_ratio:.2f}x "
          f"the expert weights per rank ({args.ep} gloo ranks x {max(1, args.threads // args.ep)} thread(s), "
          f"{args.tokens} tokens per rank)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=480)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2, help="ranks of the EP comparison (1 skips it)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    result = {"args": vars(args), "grouped_vs_loop": grouped_vs_loop(args)}
    if args.ep > 1:
        result["expert_parallel"] = expert_parallel(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""One MoE layer's forward+backward: the grouped-GEMM experts against the per-expert loop.

    python benchmarks/bench_moe.py [--dim 1536 --hidden 480 --experts 16 --top-k 6 --tokens 1024]

The defaults are the 770M config's core MoE dims with 16 of its 64 experts (all 64 would need
~12 GiB for the loop's zero-filled gradients alone, in fp32).  "loop" is how the layer ran its
experts before the grouped GEMM: ``F.linear`` over ``w[e]`` of the stacked weights, one expert
at a time (each ``w[e]``'s backward, ``select_backward``, allocates a zero-filled gradient the
size of the whole stacked weight), and the outputs combined by ``index_add``.  Both variants are
timed alternately in one process (median of ``--steps``); bytes allocated during one
forward+backward come from torch.profiler's memory events.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mythos_scale.config import config_from_dict
from mythos_scale.kernels import ops, select_kernels
from mythos_scale.model import MoE


def loop_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer as it ran before: experts in a Python loop over ``w[e]``, index_add combine."""
    flat = x.reshape(-1, x.shape[-1])
    _, chosen, gates = layer.route(flat, 0)
    order = torch.argsort(chosen.flatten(), stable=True)
    token = order // layer.top_k
    counts = torch.bincount(chosen.flatten(), minlength=layer.n_experts).tolist()
    e = layer.experts
    outputs = [F.linear(ops().swiglu(F.linear(rows, e.w_gate[i]), F.linear(rows, e.w_up[i])), e.w_down[i])
               for i, rows in enumerate(flat.index_select(0, token).split(counts)) if rows.shape[0]]
    weighted = torch.cat(outputs) * gates.flatten()[order].unsqueeze(-1)
    y = flat.new_zeros(flat.shape).index_add(0, token, weighted)
    return y.view_as(x)  # no shared expert in this benchmark


def grouped_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    return layer(x, 0)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=480)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    select_kernels("reference")
    cfg = config_from_dict({"model": {"dim": args.dim, "moe": {
        "n_routed_experts": args.experts, "top_k": args.top_k, "expert_hidden": args.hidden,
        "n_shared_experts": 0}}}).model
    layer = MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    x = torch.randn(1, args.tokens, args.dim, generator=gen)
    grad = torch.randn(1, args.tokens, args.dim, generator=gen)
    variants = {"loop": loop_forward, "grouped": grouped_forward}

    def step(forward) -> None:
        forward(layer, x.clone().requires_grad_()).backward(grad)
        layer.zero_grad(set_to_none=True)

    for forward in variants.values():
        step(forward)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, forward in variants.items():
            start = time.perf_counter()
            step(forward)
            seconds[name].append(time.perf_counter() - start)
    result = {"args": vars(args), "variants": {}}
    for name, forward in variants.items():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(forward)
        allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
        zero_fill = sum(e.cpu_memory_usage for e in prof.events()
                        if e.name == "aten::select_backward" and e.cpu_memory_usage > 0)
        median = statistics.median(seconds[name])
        result["variants"][name] = {"median_s": median, "allocated_gib": allocated / 2 ** 30,
                                    "select_backward_gib": zero_fill / 2 ** 30}
        print(f"{name:>8}: {median * 1e3:8.1f} ms fwd+bwd | {allocated / 2 ** 30:6.2f} GiB allocated "
              f"({zero_fill / 2 ** 30:.2f} GiB by select_backward)")
    speedup = result["variants"]["loop"]["median_s"] / result["variants"]["grouped"]["median_s"]
    result["speedup"] = speedup
    print(f"grouped GEMM: {speedup:.2f}x the loop ({args.tokens} tokens, d{args.dim}, {args.experts} experts x "
          f"{args.hidden}, top-{args.top_k}, fp32, {args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

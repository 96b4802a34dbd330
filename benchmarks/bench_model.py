"""Training-step throughput of the model on CPU, against the fp32 matmul rate of the same run.

    python benchmarks/bench_model.py [--config configs/tiny_cpu.yaml] [--loops 4] [--json out.json]

A step is the model's share of a training step: forward, cross-entropy, backward and (unless
``--no-optimizer``) an AdamW step.  Model FLOP/s use the `mythos plan` count (the FLOPs of the
T loops actually run; the optimizer's are not counted).  The roofline is an fp32 matmul
(``--matmul`` n x n x n, 2 n^3 FLOPs) run back to back for as long as the step took, right
after every step, so both see the same machine load: the printed fraction is the median over steps of (model
FLOP/s of the step) / (matmul FLOP/s measured after it).  ``--profile ROWS`` prints the top ops
of one step (torch.profiler, self CPU time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mythos_scale.config import load_config
from mythos_scale.model import build_model
from mythos_scale.plan import plan_model
from mythos_scale.train.optim import build_optimizer


def matmul_gflops(size: int, seconds: float) -> float:
    """fp32 ``size^3`` matmul rate of this process's threads, averaged over about ``seconds`` of
    back-to-back matmuls (as long as a step: the same share of a busy machine as the step got)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--backprop-depth", type=int, help="default: all loops")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help="default: model.max_seq_len")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul", type=int, default=1024, help="size n of the n x n x n fp32 roofline matmul")
    parser.add_argument("--no-optimizer", action="store_true", help="forward and backward only")
    parser.add_argument("--kernels", choices=["auto", "fused", "reference"], default="auto",
                        help="model.kernels: the fused extension or the PyTorch reference ops")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.kernels == "fused":  # build (once, cached) and load the CPU extension if not installed
        from mythos_scale.kernels.build import load_extension

        load_extension()
    cfg = load_config(args.config, [f"model.kernels={args.kernels}"])
    model_cfg = cfg.model
    seq = args.seq_len or model_cfg.max_seq_len
    depth = args.backprop_depth if args.backprop_depth is not None else args.loops
    model = build_model(model_cfg, seed=0).train()
    optimizer = None if args.no_optimizer else build_optimizer(model, cfg.train)
    tokens = torch.randint(0, model_cfg.vocab_size, (args.batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        out = model(inputs, n_loops=args.loops, backprop_depth=depth)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        (loss + out.moe_aux_loss + out.ponder_cost).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    plan = plan_model(model_cfg, args.loops, depth, seq)
    flops_per_step = plan["flops_per_token"] * args.batch * seq
    for _ in range(args.warmup):
        step()
    seconds, fractions, matmul = [], [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        matmul.append(matmul_gflops(args.matmul, seconds[-1]))
        fractions.append(flops_per_step / seconds[-1] / 1e9 / matmul[-1])
    median = statistics.median(seconds)
    tokens_per_s = args.batch * seq / median
    result = {
        "config": args.config, "loops": args.loops, "backprop_depth": depth, "batch": args.batch,
        "seq_len": seq, "threads": args.threads, "kernels": args.kernels, "optimizer": optimizer is not None,
        "params_total": plan["params_total"], "seconds_per_step": median, "tokens_per_s": tokens_per_s,
        "model_gflops_per_s": flops_per_step / median / 1e9,
        "matmul_gflops_per_s": statistics.median(matmul),
        "fraction_of_matmul_rate": statistics.median(fractions),
    }
    for key, value in result.items():
        print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Forward+backward throughput of the model on CPU (or the current default device).

    python benchmarks/bench_model.py [--config configs/tiny_cpu.yaml] [--loops 4] [--json out.json]

Prints tokens/s of a full training step's model work (forward, backward; no optimizer) and the
achieved FLOP/s by the `mythos plan` count.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mythos_scale.config import load_config
from mythos_scale.model import build_model
from mythos_scale.plan import plan_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--backprop-depth", type=int, help="default: all loops")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help="default: model.max_seq_len")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", choices=["auto", "fused", "reference"], default="auto",
                        help="model.kernels: the fused extension or the PyTorch reference ops")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.kernels == "fused":  # build (once, cached) and load the CPU extension if not installed
        from mythos_scale.kernels.build import load_extension

        load_extension()
    cfg = load_config(args.config, [f"model.kernels={args.kernels}"]).model
    seq = args.seq_len or cfg.max_seq_len
    depth = args.backprop_depth if args.backprop_depth is not None else args.loops
    model = build_model(cfg, seed=0).train()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        out = model(inputs, n_loops=args.loops, backprop_depth=depth)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        (loss + out.moe_aux_loss + out.ponder_cost).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    tokens_per_s = args.batch * seq * args.steps / elapsed
    plan = plan_model(cfg, args.loops, depth, seq)
    result = {
        "config": args.config, "loops": args.loops, "backprop_depth": depth, "batch": args.batch,
        "seq_len": seq, "threads": args.threads, "params_total": plan["params_total"],
        "seconds_per_step": elapsed / args.steps, "tokens_per_s": tokens_per_s,
        "model_gflops_per_s": tokens_per_s * plan["flops_per_token"] / 1e9,
    }
    for key, value in result.items():
        print(f"{key:>18}: {value:.4g}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

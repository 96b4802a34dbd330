"""Peak memory and time of the LM head + loss: full logits vs chunked (train.loss_chunk_tokens).

    python benchmarks/bench_loss.py [--config configs/mythos_770m.yaml] [--tokens 2048]
        [--chunk 2048] [--device cpu|cuda] [--dtype float32|bfloat16] [--json PATH]

Vocabulary and width come from the config (the 770M's: 32768 x 1536), with a small micro-batch of
``--tokens`` tokens.  Peak memory is measured at the dispatcher (mythos_scale.plan.alloc_tracker,
any device) over the loss forward + backward, beyond the states and head weight, and printed
beside the planner's ``loss_peak_bytes``; on CUDA also ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mythos_scale.config import load_config
from mythos_scale.plan.alloc_tracker import PeakTracker
from mythos_scale.plan.layout import Runtime
from mythos_scale.plan.memory import loss_peak_bytes
from mythos_scale.train.lm_loss import chunked_linear_cross_entropy, full_linear_cross_entropy

MIB = 2 ** 20


def measure(path: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
            z_loss_coef: float) -> dict[str, float]:
    hidden.grad = weight.grad = None
    cuda = hidden.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with PeakTracker() as tracker:
        if path == "full":
            loss = full_linear_cross_entropy(hidden, weight, labels, z_loss_coef)
        else:
            loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk, z_loss_coef)
        loss.total.backward()
    if cuda:
        torch.cuda.synchronize()
    row = {"path": path, "seconds": time.perf_counter() - start, "peak_mib": tracker.peak / MIB,
           "loss": float(loss.total.detach())}
    if cuda:
        row["cuda_max_allocated_mib"] = (torch.cuda.max_memory_allocated() - start_bytes) / MIB
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "mythos_770m.yaml"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    cfg = load_config(args.config)
    dtype = getattr(torch, args.dtype)
    vocab, dim, z_coef = cfg.model.vocab_size, cfg.model.dim, cfg.train.z_loss_coef
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, dim, generator=gen).to(args.device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(vocab, dim, generator=gen)).to(args.device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (args.tokens,), generator=gen).to(args.device)
    rows = []
    for path, chunk in (("full", 0), ("chunked", args.chunk)):
        row = measure(path, hidden, weight, labels, chunk, z_coef)
        rt = Runtime(device=args.device, compute_bytes=hidden.element_size(), fused_kernels=False,
                     z_loss=z_coef > 0, reduce_bucket_size=1, multi_rank_bucket_allreduce=False,
                     overlap_comm=False, loss_chunk_tokens=chunk)
        row["planner_mib"] = loss_peak_bytes(cfg.model, rt, args.tokens) / MIB
        rows.append(row)
        print(f"{path:8s} peak {row['peak_mib']:9.1f} MiB (planner {row['planner_mib']:9.1f})  "
              f"{row['seconds']:.2f} s  loss {row['loss']:.6f}")
    result = {"vocab": vocab, "dim": dim, "tokens": args.tokens, "chunk": args.chunk, "dtype": args.dtype,
              "device": args.device, "z_loss_coef": z_coef, "rows": rows,
              "saving_mib": rows[0]["peak_mib"] - rows[1]["peak_mib"],
              "planner_saving_mib": rows[0]["planner_mib"] - rows[1]["planner_mib"]}
    print(f"saving {result['saving_mib']:.1f} MiB (planner {result['planner_saving_mib']:.1f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

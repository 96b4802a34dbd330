"""Fused kernels vs the unfused PyTorch references: time, bytes moved and achieved bandwidth per op.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--dtype float32|bfloat16] [--json PATH]

For each op, forward and forward+backward are timed for the fused ``mythos::`` operator and the
reference.  "bytes" is the least traffic the op needs (each input read once, each output written
once), so bytes / time is the achieved bandwidth; it is compared with a measured device copy
(``dst.copy_(src)``, read + write).  Without an installed ``mythos_scale._C`` the CPU kernels are
built first (mythos_scale.kernels.build.default_build_dir).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mythos_scale.kernels import build, reference


@dataclass
class Case:
    op: str
    shape: str
    bytes_forward: int
    bytes_backward: int
    make_inputs: Callable[[], list[torch.Tensor]]
    call: Callable[[object, list[torch.Tensor]], object]


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(tokens: int, dim: int, ffn: int, top_k: int, heads: int, rope_dim: int, dtype: torch.dtype,
          device: torch.device) -> list[Case]:
    def rand(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=device)

    x, vec, f = rand(tokens, dim), rand(dim), rand(tokens, ffn)
    p, idx_rows = torch.rand(tokens, dtype=dtype, device=device), tokens * top_k
    order = torch.argsort(torch.randint(0, 64, (idx_rows,), device=device), stable=True)  # 64 experts
    rows = torch.empty_like(order).scatter_(0, order, torch.arange(idx_rows, device=device)).view(tokens, top_k)
    gate = torch.rand(tokens, top_k, dtype=dtype, device=device)
    y = rand(idx_rows, dim)
    seq = tokens // 2
    q = rand(2, seq, heads, rope_dim)
    angles = torch.rand(seq, rope_dim // 2, device=device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def grad_leaves(*ts):
        return lambda: [t.clone().requires_grad_() for t in ts]

    return [
        Case("inject_rmsnorm", f"({tokens}, {dim})", 3 * _nbytes(x), 5 * _nbytes(x),
             grad_leaves(x, x, vec, vec, vec), lambda m, t: m.inject_rmsnorm(*t, 1e-6)),
        Case("act_step", f"({tokens}, {dim})", 3 * _nbytes(x), 3 * _nbytes(x),
             grad_leaves(p, torch.zeros_like(p), x, x), lambda m, t: m.act_step(*t, 0.99, False)),
        Case("moe_permute", f"({tokens}, {dim}) x top-{top_k}", 2 * _nbytes(y), _nbytes(y) + _nbytes(x),
             grad_leaves(x), lambda m, t: m.moe_permute(t[0], rows)),
        Case("moe_unpermute", f"({idx_rows}, {dim}) -> ({tokens}, {dim})", _nbytes(y) + _nbytes(x),
             _nbytes(x) + 2 * _nbytes(y), grad_leaves(y, gate),
             lambda m, t: m.moe_unpermute(t[0], rows, t[1])),
        Case("swiglu", f"({tokens}, {ffn})", 3 * _nbytes(f), 5 * _nbytes(f),
             grad_leaves(f, f), lambda m, t: m.swiglu(*t)),
        Case("apply_rope", f"(2, {seq}, {heads}, {rope_dim})", 2 * _nbytes(q), 2 * _nbytes(q),
             grad_leaves(q), lambda m, t: m.apply_rope(t[0], cos, sin)),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` calls of fn() after two warm-up calls (the least disturbed by other load)."""
    for _ in range(2):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return min(samples)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a device copy (counting read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds


def forward_backward(impl, case: Case) -> Callable[[], None]:
    def run() -> None:
        inputs = case.make_inputs()
        out = case.call(impl, inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from mythos_scale.kernels import fused
    except ImportError:
        build.load_extension(cuda=device.type == "cuda")
        from mythos_scale.kernels import fused

    copy_bw = copy_bandwidth(device, 256 << 20 if device.type == "cuda" else 64 << 20, args.repeats)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"copy bandwidth={copy_bw / 1e9:.1f} GB/s")
    header = (f"{'op':<15}{'shape':<28}{'pass':<9}{'MB':>8}{'ref ms':>10}{'fused ms':>10}"
              f"{'speedup':>9}{'fused GB/s':>12}{'% copy':>8}")
    print(header)
    print("-" * len(header))
    records = []
    for case in cases(args.tokens, args.dim, args.ffn, args.top_k, args.heads, args.rope_dim, dtype, device):
        fixed = case.make_inputs()
        for pass_name, nbytes, make_fn in (
            ("forward", case.bytes_forward, lambda impl: (lambda: case.call(impl, fixed))),
            ("fwd+bwd", case.bytes_forward + case.bytes_backward, lambda impl: forward_backward(impl, case)),
        ):
            with torch.set_grad_enabled(pass_name != "forward"):
                ref_s = time_call(make_fn(reference), device, args.repeats)
                fused_s = time_call(make_fn(fused), device, args.repeats)
            bandwidth = nbytes / fused_s
            record = {"op": case.op, "shape": case.shape, "pass": pass_name, "bytes": nbytes,
                      "reference_ms": ref_s * 1e3, "fused_ms": fused_s * 1e3, "speedup": ref_s / fused_s,
                      "fused_gbps": bandwidth / 1e9, "fraction_of_copy": bandwidth / copy_bw}
            records.append(record)
            print(f"{case.op:<15}{case.shape:<28}{pass_name:<9}{nbytes / 1e6:>8.1f}{ref_s * 1e3:>10.3f}"
                  f"{fused_s * 1e3:>10.3f}{ref_s / fused_s:>8.2f}x{bandwidth / 1e9:>12.1f}"
                  f"{100 * bandwidth / copy_bw:>7.0f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "copy_gbps": copy_bw / 1e9, "config": {k: v for k, v in vars(args).items() if k != "json"},
            "results": records}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""mythos plan: size a training run on a cluster before spending the cluster on it.

    mythos plan --config configs/mythos_770m.yaml --nodes 4 --gpu h100            # one layout
    mythos plan --config configs/mythos_770m.yaml --nodes 4 --gpu h100 --search   # every layout
    mythos plan ... --json                                                         # for scripts

Parameters and FLOPs are exact counts (see :mod:`counts`); memory, communication and step time
are estimates from the config's shapes (see :mod:`memory`, :mod:`comms`, :mod:`estimate`),
checked against measurements of the real trainer by ``benchmarks/plan_vs_measured.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from typing import Any

from mythos_scale.config import Config, ConfigError, load_config
from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from mythos_scale.plan.cluster import GPUS, Cluster, make_cluster
from mythos_scale.plan.counts import plan_model
from mythos_scale.plan.estimate import Plan, make_plan
from mythos_scale.plan.layout import Layout, Runtime
from mythos_scale.plan.memory import GIB
from mythos_scale.plan.search import Rejected, search


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_model(plan: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("loops T / backprop depth k / seq len", f"{plan['n_loops']} / {plan['backprop_depth']} / {plan['seq_len']}"),
        ("params total", f"{plan['params_total']:,} ({_human(plan['params_total'])})"),
    ]
    rows += [(f"  {name}", f"{n:,}") for name, n in plan["params_breakdown"].items()]
    rows += [
        ("  of which routed experts", f"{plan['params_routed_experts']:,}"),
        ("params active per token", f"{plan['params_active']:,} ({_human(plan['params_active'])})"),
        ("FLOPs per token (fwd+bwd)", _human(plan["flops_per_token"])),
        ("  forward", _human(plan["flops_per_token_forward"])),
        ("  with checkpoint recompute", _human(plan["flops_per_token_with_recompute"])),
        ("KV cache per token (bf16)", f"{plan['kv_cache_bytes_per_token']:,} B "
                                      f"({plan['kv_cache_elements_per_token']:,} elements, "
                                      f"{plan['kv_cache_layers']} layer caches)"),
        ("  MHA with the same heads", f"{plan['kv_cache_bytes_per_token_mha']:,} B "
                                      f"({plan['kv_cache_bytes_per_token_mha'] / plan['kv_cache_bytes_per_token']:.1f}x)"),
    ]
    return _rows(rows)


def format_plan(plan: Plan) -> str:
    lay, mem, t = plan.layout, plan.memory, plan.times
    status = "fits" if plan.fits else "DOES NOT FIT"
    rows = [
        ("layout", f"{lay.name()}; global batch {lay.global_batch} x {lay.seq_len} = "
                   f"{_human(lay.tokens_per_step)} tokens"),
        ("memory per GPU (GiB)", f"peak {gib(mem.peak)} at the {mem.peak_moment.replace('_', ' ')}, "
                                 f"{gib(plan.usable_bytes)} usable: {status}"),
        ("  model state", " | ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in mem.static.items())),
        ("  activations kept after forward", gib(mem.activations["kept_after_forward"])),
        ("  logits / loss / loss backward", " / ".join(gib(mem.activations[k]) for k in ("logits", "loss", "loss_backward"))),
        ("  one core iteration (recomputed)", gib(mem.activations["core_iteration"])),
        ("  moments", " | ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in mem.peaks.items())),
        ("inference (one GPU, bf16)", f"KV cache {_bytes(mem.kv_cache_bytes_per_sequence)} per "
                                      f"{lay.seq_len}-token sequence at T={lay.n_loops}: "
                                      f"{plan.inference_batch} sequences fit beside the weights"),
    ]
    for group, calls in plan.comms.items():
        for c in calls:
            rows.append((f"{group}: {c.name}", f"{c.kind.replace('_', '-')} over {c.group} ({c.group_size}): "
                                               f"{_bytes(c.payload)} x {c.calls:g}/step -> "
                                               f"{_bytes(c.wire_bytes)} sent"))
    rows += [
        ("time per step", f"compute {_seconds(t['compute'])} | dp {_seconds(t['dp_comm'])} | "
                          f"tp {_seconds(t['tp_comm'])} | ep {_seconds(t['ep_comm'])} | "
                          f"optimizer {_seconds(t['optimizer'])}"),
        ("step", f"{_seconds(t['step_no_overlap'])} without overlap, {_seconds(t['step_overlap'])} with "
                 f"the DP gradient reduction overlapped (using {_seconds(t['step'])})"),
        ("throughput", f"{_human(plan.tokens_per_second)} tokens/s, {_human(plan.tokens_per_second * 86400)} "
                       f"tokens/day; MFU {100 * plan.mfu:.1f}% (hardware {100 * plan.hfu:.1f}%)"),
        ("token budget", f"{_human(plan.token_budget)} tokens in {plan.days_to_budget:.2f} days"),
    ]
    return _rows(rows)


def _reason_kind(reason: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", reason)


def format_search(plans: list[Plan], rejected: list[Rejected], top: int) -> str:
    header = f"{'#':>3} {'dp':>4} {'tp':>3} {'ep':>3} {'zero':>4} {'mb':>3} {'ga':>4} {'ckpt':>4} " \
             f"{'peak GiB':>8} {'step':>9} {'tokens/s':>9} {'MFU':>6} {'days':>7}"
    lines = [f"{len(plans)} layouts fit, {len(rejected)} rejected; fastest first", header]
    for i, p in enumerate(plans[:top], 1):
        lay = p.layout
        lines.append(f"{i:>3} {lay.dp:>4} {lay.tp:>3} {lay.ep:>3} {lay.zero_stage:>4} {lay.micro_batch:>3} "
                     f"{lay.grad_accum:>4} {'on' if lay.checkpointing else 'off':>4} {p.memory.peak / GIB:>8.2f} "
                     f"{_seconds(p.step_seconds):>9} {_human(p.tokens_per_second):>9} {100 * p.mfu:>5.1f}% "
                     f"{p.days_to_budget:>7.2f}")
    if len(plans) > top:
        lines.append(f"    ... {len(plans) - top} more (--top N, or --json for all)")
    groups: dict[str, list[Rejected]] = defaultdict(list)
    for r in rejected:
        groups[_reason_kind(r.reasons[0])].append(r)
    if groups:
        lines.append("rejected (first reason; one example each):")
        for items in sorted(groups.values(), key=len, reverse=True):
            example = items[0]
            desc = " ".join(f"{k} {v}" for k, v in example.layout.items() if k in ("dp", "tp", "ep", "zero_stage",
                                                                                  "micro_batch", "checkpointing"))
            lines.append(f"  {len(items):>4} x {example.reasons[0]}  [{desc}]")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mythos plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (defaults when omitted)")
    p.add_argument("--loops", type=int, help="loop count T (default: train.loops.mean)")
    p.add_argument("--backprop-depth", type=int,
                   help="truncated-backprop depth k (default: min(train.loops.backprop_depth, T))")
    p.add_argument("--seq-len", type=int, help="sequence length (default: data.seq_len)")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU preset (default h100)")
    cluster.add_argument("--nodes", type=int, default=1)
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--gpu-tflops", type=float, dest="bf16_tflops", help="override the dense bf16 peak")
    cluster.add_argument("--gpu-memory-gib", type=float, dest="memory_gib", help="override the GPU memory")
    cluster.add_argument("--hbm-tbps", type=float, help="override the memory bandwidth (TB/s)")
    cluster.add_argument("--nvlink-gbps", type=float, help="override the intra-node bandwidth per GPU (GB/s)")
    cluster.add_argument("--internode-gbps", type=float, help="override the inter-node bandwidth per GPU (GB/s)")
    cluster.add_argument("--compute-efficiency", type=float, help="fraction of peak the matmuls reach (0.5)")
    cluster.add_argument("--comm-efficiency", type=float, help="fraction of link bandwidth collectives reach (0.8)")
    layout = p.add_argument_group("layout (defaults: the config's train section)")
    layout.add_argument("--dp", type=int, help="data-parallel size (default: GPUs / TP; DP x TP = GPUs)")
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--ep", type=int, default=1)
    layout.add_argument("--zero-stage", type=int, choices=(1, 2))
    layout.add_argument("--micro-batch", type=int, help="default: train.micro_batch_size, or the largest "
                        "smaller one that divides the global batch over DP")
    layout.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    layout.add_argument("--checkpointing", choices=("on", "off"), help="per-iteration activation checkpointing")
    layout.add_argument("--overlap", choices=("on", "off"),
                        help="overlap the DP gradient reduction with backward (default: deepspeed overlap_comm)")
    p.add_argument("--tokens", type=float, help="token budget (default: train.max_steps x global batch x seq len)")
    p.add_argument("--search", action="store_true", help="estimate every layout; fastest that fit first")
    p.add_argument("--top", type=int, default=10, help="layouts to list with --search")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dim=512")
    return p


def _build(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    n_loops = args.loops if args.loops is not None else cfg.train.loops.mean
    depth = args.backprop_depth if args.backprop_depth is not None else min(cfg.train.loops.backprop_depth, n_loops)
    seq_len = args.seq_len if args.seq_len is not None else cfg.data.seq_len
    model = plan_model(cfg.model, n_loops, depth, seq_len)
    cluster = make_cluster(args.gpu, args.nodes, args.gpus_per_node, bf16_tflops=args.bf16_tflops,
                           memory_gib=args.memory_gib, hbm_tbps=args.hbm_tbps, nvlink_gbps=args.nvlink_gbps,
                           internode_gbps=args.internode_gbps, compute_efficiency=args.compute_efficiency,
                           comm_efficiency=args.comm_efficiency)
    rt = Runtime.from_config(cfg, device="cuda")
    overlap = rt.overlap_comm if args.overlap is None else args.overlap == "on"
    global_batch = args.global_batch or cfg.train.global_batch_size
    budget = args.tokens if args.tokens is not None else cfg.train.max_steps * global_batch * seq_len
    out: dict[str, Any] = {"model": model, "cluster": cluster}
    if args.search:
        out["search"] = search(cfg, cluster, rt, seq_len=seq_len, n_loops=n_loops, backprop_depth=depth,
                               global_batch=global_batch, overlap=overlap, token_budget=budget)
        return out
    if args.tp < 1 or cluster.world % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide the {cluster.world} GPUs")
    dp = cluster.world // args.tp
    if args.dp is not None and args.dp != dp:
        raise ValueError(f"--dp {args.dp} x --tp {args.tp} must equal the cluster's {cluster.world} GPUs")
    if global_batch < dp:
        raise ValueError(f"global batch {global_batch} is smaller than DP {dp}: set --global-batch")
    micro = args.micro_batch or max(m for m in range(1, cfg.train.micro_batch_size + 1)
                                    if global_batch % (m * dp) == 0)
    if global_batch % (micro * dp):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch {micro} x DP {dp}; "
                         "set --global-batch or --micro-batch")
    ckpt = cfg.model.activation_checkpointing if args.checkpointing is None else args.checkpointing == "on"
    layout = Layout(dp=dp, tp=args.tp, ep=args.ep, zero_stage=args.zero_stage or cfg.train.zero_stage,
                    micro_batch=micro, grad_accum=global_batch // (micro * dp), seq_len=seq_len, n_loops=n_loops,
                    backprop_depth=depth, checkpointing=ckpt)
    out["plan"] = make_plan(cfg, cluster, layout, rt, overlap, budget)
    return out


def _cluster_dict(cluster: Cluster) -> dict[str, Any]:
    return {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "gpu": vars(cluster.gpu),
            "compute_efficiency": cluster.compute_efficiency, "comm_efficiency": cluster.comm_efficiency}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = _build(args, cfg)
    except (ConfigError, ValueError) as err:
        print(f"mythos plan: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cluster = result["cluster"]
    if args.json:
        out: dict[str, Any] = {"model": result["model"], "cluster": _cluster_dict(cluster)}
        if "plan" in result:
            out["plan"] = result["plan"].as_dict()
        else:
            plans, rejected = result["search"]
            out["fits"] = [p.as_dict() for p in plans]
            out["rejected"] = [{"layout": r.layout, "reasons": r.reasons} for r in rejected]
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print(f"{args.config or 'defaults'} on {cluster.describe()} "
          f"(compute at {cluster.compute_efficiency:.0%} of {cluster.gpu.bf16_tflops:g} TFLOP/s, "
          f"links at {cluster.comm_efficiency:.0%})")
    print(format_model(result["model"]))
    print()
    if "plan" in result:
        print(format_plan(result["plan"]))
    else:
        print(format_search(*result["search"], top=args.top))
    return EXIT_OK

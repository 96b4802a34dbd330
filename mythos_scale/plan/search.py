"""Every layout of a cluster, estimated; the ones that fit, fastest first, and why the others fail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mythos_scale.config import Config
from mythos_scale.plan.cluster import Cluster
from mythos_scale.plan.estimate import Plan, make_plan
from mythos_scale.plan.layout import Layout, Runtime, layout_problems
from mythos_scale.plan.memory import GIB

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Rejected:
    layout: dict[str, Any]
    reasons: list[str]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(up_to: int) -> list[int]:
    return [1 << i for i in range(up_to.bit_length()) if 1 << i <= up_to]


def search(cfg: Config, cluster: Cluster, rt: Runtime, *, seq_len: int, n_loops: int, backprop_depth: int,
           global_batch: int, overlap: bool, token_budget: float) -> tuple[list[Plan], list[Rejected]]:
    """All (TP, EP, ZeRO stage, micro-batch, checkpointing) layouts of ``cluster`` for a fixed
    recipe (global batch, sequence length, T, k).  TP runs over the divisors of a node's GPUs
    (and twice a node, to say why not), EP over the divisors of DP and the powers of two up to
    twice DP."""
    fits: list[Plan] = []
    rejected: list[Rejected] = []
    for tp in sorted(set(_divisors(cluster.gpus_per_node)) | {2 * cluster.gpus_per_node}):
        if cluster.world % tp:
            continue
        dp = cluster.world // tp
        for ep in sorted(set(_divisors(dp)) | set(_powers_of_two(2 * dp))):
            for zero in (1, 2):
                for micro in MICRO_BATCHES:
                    for ckpt in (True, False):
                        desc = {"dp": dp, "tp": tp, "ep": ep, "zero_stage": zero, "micro_batch": micro,
                                "checkpointing": ckpt}
                        if micro * dp > global_batch or global_batch % (micro * dp):
                            rejected.append(Rejected(desc, [
                                f"global batch {global_batch} not a multiple of micro-batch {micro} x DP {dp}"]))
                            continue
                        layout = Layout(dp=dp, tp=tp, ep=ep, zero_stage=zero, micro_batch=micro,
                                        grad_accum=global_batch // (micro * dp), seq_len=seq_len, n_loops=n_loops,
                                        backprop_depth=backprop_depth, checkpointing=ckpt)
                        problems = layout_problems(cfg, layout, cluster.gpus_per_node)
                        if problems:
                            rejected.append(Rejected(layout.as_dict(), problems))
                            continue
                        plan = make_plan(cfg, cluster, layout, rt, overlap, token_budget)
                        if plan.fits:
                            fits.append(plan)
                        else:
                            rejected.append(Rejected(layout.as_dict(), [
                                f"out of memory: {plan.memory.peak / GIB:.1f} GiB at the "
                                f"{plan.memory.peak_moment.replace('_', ' ')} "
                                f"> {plan.usable_bytes / GIB:.1f} GiB usable"]))
    fits.sort(key=lambda p: (-p.tokens_per_second, p.memory.peak))
    return fits, rejected

"""A whole plan: memory, communication, step time, MFU and throughput of one layout on a cluster.

Step time = compute + the communication nothing hides + the optimizer step:

- compute: this GPU's hardware FLOPs (forward, backward, checkpoint recompute; TP-split parts
  divided by TP, replicated parts and the routed experts not) at ``compute_efficiency`` x peak;
- communication: each collective's wire bytes at ``comm_efficiency`` x the bandwidth of the
  link its group crosses (NVLink inside a node; the per-GPU inter-node bandwidth once a group
  spans nodes; an all-to-all spanning nodes sends its off-node share over the network), plus a
  fixed latency per call.  TP and EP collectives sit on the critical path.  Without overlap the
  DP gradient reduction adds in full; with overlap (DeepSpeed ``overlap_comm``) only what the
  backward cannot hide.  The parameter all-gather after the optimizer step is never hidden;
- optimizer: Adam on this GPU's shard, bound by memory bandwidth (~32 bytes per parameter read
  and written: fp32 master, two moments, fp32 gradient, the compute-dtype copy).

MFU uses the model FLOPs (``plan_model``'s count, no recompute, no TP duplication); the hardware
FLOP utilisation counts what the GPUs actually execute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mythos_scale.config import Config
from mythos_scale.plan.cluster import Cluster
from mythos_scale.plan.comms import Collective, communication
from mythos_scale.plan.counts import plan_model
from mythos_scale.plan.layout import Layout, Runtime, layout_problems
from mythos_scale.plan.memory import Memory, estimate_memory, usable_bytes
from mythos_scale.plan.per_gpu import local_params, model_parts

OPTIMIZER_BYTES_PER_PARAM = 32
SECONDS_PER_DAY = 86_400


@dataclass
class Plan:
    layout: Layout
    cluster: Cluster
    memory: Memory
    comms: dict[str, list[Collective]]
    model_flops_per_token: float
    hardware_flops_per_gpu_step: float
    times: dict[str, float]
    usable_bytes: float
    token_budget: float
    params_total: int

    @property
    def inference_batch(self) -> int:
        """Sequences of ``seq_len`` whose KV cache fits on one GPU beside the bf16 weights."""
        free = self.usable_bytes - 2 * self.params_total
        return max(0, int(free // self.memory.kv_cache_bytes_per_sequence)) if free > 0 else 0

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.usable_bytes

    @property
    def step_seconds(self) -> float:
        return self.times["step"]

    @property
    def tokens_per_second(self) -> float:
        return self.layout.tokens_per_step / self.step_seconds

    @property
    def mfu(self) -> float:
        peak = self.cluster.gpu.bf16_tflops * 1e12 * self.cluster.world
        return self.model_flops_per_token * self.tokens_per_second / peak

    @property
    def hfu(self) -> float:
        return self.hardware_flops_per_gpu_step / self.step_seconds / (self.cluster.gpu.bf16_tflops * 1e12)

    @property
    def days_to_budget(self) -> float:
        return self.token_budget / self.tokens_per_second / SECONDS_PER_DAY

    def as_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.as_dict(),
            "fits": self.fits,
            "memory": {**self.memory.as_dict(), "usable": self.usable_bytes},
            "communication": {group: [c.as_dict() for c in calls] for group, calls in self.comms.items()},
            "wire_bytes_per_step": {group: sum(c.wire_bytes for c in calls) for group, calls in self.comms.items()},
            "model_flops_per_token": self.model_flops_per_token,
            "hardware_flops_per_gpu_step": self.hardware_flops_per_gpu_step,
            "time_s": self.times,
            "tokens_per_step": self.layout.tokens_per_step,
            "tokens_per_s": self.tokens_per_second,
            "tokens_per_day": self.tokens_per_second * SECONDS_PER_DAY,
            "mfu": self.mfu,
            "hardware_flops_utilization": self.hfu,
            "token_budget": self.token_budget,
            "days_to_budget": self.days_to_budget,
            "inference_sequences_per_gpu": self.inference_batch,
        }


def _group_crosses_nodes(cluster: Cluster, layout: Layout, group: str) -> bool:
    if group == "tp":
        return False
    if group == "ep":
        return layout.ep * layout.tp > cluster.gpus_per_node
    return layout.world > cluster.gpus_per_node   # dp, edp, world: stride x size = world


def collective_seconds(c: Collective, cluster: Cluster, layout: Layout) -> float:
    if c.group_size == 1:
        return 0.0
    gpu, eff = cluster.gpu, cluster.comm_efficiency
    intra, inter = gpu.nvlink_gbps * 1e9 * eff, gpu.internode_gbps * 1e9 * eff
    crosses = _group_crosses_nodes(cluster, layout, c.group)
    latency = c.calls * 1e-6 * (cluster.latency_us_inter if crosses else cluster.latency_us_intra)
    if not crosses:
        return c.wire_bytes / intra + latency
    if c.kind != "all_to_all":
        return c.wire_bytes / inter + latency
    peers_on_node = max(1, cluster.gpus_per_node // layout.tp) - 1     # of the EP group, on this node
    off_node = (layout.ep - 1 - peers_on_node) / (layout.ep - 1)
    return max(c.wire_bytes * off_node / inter, c.wire_bytes * (1 - off_node) / intra) + latency


def make_plan(cfg: Config, cluster: Cluster, layout: Layout, rt: Runtime, overlap: bool,
              token_budget: float) -> Plan:
    problems = layout_problems(cfg, layout, cluster.gpus_per_node)
    if problems:
        raise ValueError("; ".join(problems))
    if layout.world != cluster.world:
        raise ValueError(f"layout uses {layout.world} GPUs (dp {layout.dp} x tp {layout.tp}), "
                         f"the cluster has {cluster.world}")
    m = cfg.model
    counts = plan_model(m, layout.n_loops, layout.backprop_depth, layout.seq_len)
    parts = model_parts(m, layout.seq_len)
    step_parts = parts.step_flops_per_token(m, layout.n_loops, layout.backprop_depth, layout.checkpointing)
    tokens_per_replica = layout.tokens_per_micro_batch * layout.grad_accum
    hardware = step_parts.per_gpu(layout.tp) * tokens_per_replica
    backward = parts.backward_flops_per_token(m, layout.backprop_depth)
    flops_per_second = cluster.gpu.bf16_tflops * 1e12 * cluster.compute_efficiency
    compute = hardware / flops_per_second
    backward_compute = backward.per_gpu(layout.tp) * tokens_per_replica / flops_per_second

    comms = communication(m, layout, rt)
    seconds = {group: sum(collective_seconds(c, cluster, layout) for c in calls) for group, calls in comms.items()}
    dp_gradients = sum(collective_seconds(c, cluster, layout) for c in comms["dp"] if c.name.endswith("gradients"))
    dp_rest = seconds["dp"] - dp_gradients
    memory = estimate_memory(m, layout, rt, counts["kv_cache_bytes_per_token"])
    optimizer = local_params(m, layout).shard * OPTIMIZER_BYTES_PER_PARAM / (cluster.gpu.hbm_tbps * 1e12)
    exposed = compute + seconds["tp"] + seconds["ep"] + dp_rest + optimizer
    times = {
        "compute": compute, "dp_comm": seconds["dp"], "tp_comm": seconds["tp"], "ep_comm": seconds["ep"],
        "optimizer": optimizer,
        "step_no_overlap": exposed + dp_gradients,
        "step_overlap": exposed + max(0.0, dp_gradients - backward_compute),
    }
    times["step"] = times["step_overlap" if overlap else "step_no_overlap"]
    return Plan(layout=layout, cluster=cluster, memory=memory, comms=comms,
                model_flops_per_token=counts["flops_per_token"], hardware_flops_per_gpu_step=hardware,
                times=times, usable_bytes=usable_bytes(cluster.gpu.memory_gib), token_budget=token_budget,
                params_total=counts["params_total"])

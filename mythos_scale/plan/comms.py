"""Communication of one training step, per GPU: every collective, its group, payload and count.

``payload`` is the tensor handed to the collective (all-gather: the gathered output; all-to-all:
the rank's send buffer).  Bytes a rank puts on the wire follow the bandwidth-optimal (ring)
algorithms NCCL uses: all-reduce ``2 (n-1)/n``, reduce-scatter / all-gather / reduce-to-owners
``(n-1)/n`` of the payload; all-to-all ``(n-1)/n`` of the send buffer (balanced routing).

Data parallel (DeepSpeed ZeRO-1/2, ``deepspeed/runtime/zero/stage_1_and_2.py``):

- gradients go through a contiguous bucket of ``reduce_bucket_size`` elements; with
  ``use_multi_rank_bucket_allreduce`` (DeepSpeed's default) each bucket is **all-reduced** over
  the data-parallel group (each rank then keeps its partition), else each slice is reduced to
  the rank that owns it.  Dense gradients over DP, expert gradients over DP / EP.
- ZeRO-1 reduces once per step, at the gradient-accumulation boundary.  ZeRO-2 reduces in every
  backward, so its gradient traffic is ``grad_accum`` times ZeRO-1's.
- after the optimizer step each parameter group's flat buffer is all-gathered over its group.
- the trainer all-reduces the MoE expert counts (``core_layers x max_loops x experts`` int64)
  over the world every step for the auxiliary-loss-free balancing.  A handful of scalar
  all-reduces (gradient norm, overflow flag, logged losses, the stop flag) are not modelled.

Tensor parallel (per micro-batch; Megatron's f/g pair per sub-layer): every attention and FFN
sub-layer pass all-reduces its N x D output in the forward and its input gradient in the
backward; the checkpointed iterations' recompute repeats the forward ones.  The gradients of
the replicated attention down-projections, their norms and the LoRA adapters are partial per
TP rank (they feed head-split projections) and are all-reduced over TP once per step.

Expert parallel (dropless all-to-all, per MoE call): the counts per expert are exchanged
first, then the top-k token rows are dispatched and the expert outputs combined: one
all-to-all each way (N k D elements) in the forward, the same two in the backward.  Every
loop iteration calls each core layer's MoE, the no-grad ones included.
"""

from __future__ import annotations

from dataclasses import dataclass

from mythos_scale.config import ModelConfig
from mythos_scale.plan.layout import Layout, Runtime
from mythos_scale.plan.per_gpu import _attention, local_params

INT64 = 8

WIRE_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}


@dataclass(frozen=True)
class Collective:
    name: str
    kind: str            # a key of WIRE_FACTOR
    group: str           # "dp", "edp", "tp", "ep", "world"
    group_size: int
    payload: float       # bytes handed to one call
    calls: float         # per optimizer step

    @property
    def wire_bytes(self) -> float:
        """Bytes this rank sends per step."""
        return WIRE_FACTOR[self.kind](self.group_size) * self.payload * self.calls

    @property
    def payload_per_step(self) -> float:
        return self.payload * self.calls

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "group": self.group, "group_size": self.group_size,
                "payload_bytes": self.payload, "calls_per_step": self.calls, "wire_bytes_per_step": self.wire_bytes}


def group_size(layout: Layout, group: str) -> int:
    return {"dp": layout.dp, "edp": layout.edp, "tp": layout.tp, "ep": layout.ep, "world": layout.world}[group]


def data_parallel(cfg: ModelConfig, layout: Layout, rt: Runtime) -> list[Collective]:
    b = rt.compute_bytes
    held = local_params(cfg, layout)
    dense, expert = held.dense, held.expert
    reductions = layout.grad_accum if layout.zero_stage == 2 else 1
    kind = "all_reduce" if rt.multi_rank_bucket_allreduce else "reduce"
    # without EP DeepSpeed sees no expert groups: one set of collectives over DP
    groups = [("dense", dense, "dp"), ("expert", expert, "edp")] if layout.ep > 1 else [("all", dense + expert, "dp")]
    out = []
    for name, count, group in groups:
        if not count:
            continue
        size = group_size(layout, group)
        prefix = "" if name == "all" else f"{name} "
        out.append(Collective(f"{prefix}gradients", kind, group, size, count * b, reductions))
        if size > 1:  # DeepSpeed skips the all-gather of a group of one
            out.append(Collective(f"{prefix}parameters", "all_gather", group, size, count * b, 1))
    if cfg.moe.enabled:
        counts = cfg.core_layers * cfg.max_loops * cfg.moe.n_routed_experts * INT64
        out.append(Collective("MoE expert counts", "all_reduce", "world", layout.world, counts, 1))
    return out


def tensor_parallel(cfg: ModelConfig, layout: Layout, rt: Runtime) -> list[Collective]:
    if layout.tp == 1:
        return []
    n_tokens = layout.tokens_per_micro_batch
    dense_passes = cfg.prelude_layers + cfg.coda_layers
    core = cfg.core_layers
    recompute = layout.backprop_depth if layout.checkpointing else 0
    forward = dense_passes + core * (layout.n_loops + recompute)
    backward = dense_passes + core * layout.backprop_depth
    activation = n_tokens * cfg.dim * rt.compute_bytes
    partial = ((cfg.prelude_layers + cfg.coda_layers) * _attention(cfg, core=False)[0].replicated
               + core * _attention(cfg, core=True)[0].replicated)
    return [
        Collective("sub-layer outputs (fwd)", "all_reduce", "tp", layout.tp, activation, 2 * forward * layout.grad_accum),
        Collective("sub-layer input grads (bwd)", "all_reduce", "tp", layout.tp, activation,
                   2 * backward * layout.grad_accum),
        Collective("replicated-weight grads", "all_reduce", "tp", layout.tp, partial * rt.compute_bytes, 1),
    ]


def expert_parallel(cfg: ModelConfig, layout: Layout, rt: Runtime) -> list[Collective]:
    m = cfg.moe
    if layout.ep == 1 or not m.enabled:
        return []
    recompute = layout.backprop_depth if layout.checkpointing else 0
    forward_calls = cfg.core_layers * (layout.n_loops + recompute) * layout.grad_accum
    backward_calls = cfg.core_layers * layout.backprop_depth * layout.grad_accum
    rows = layout.tokens_per_micro_batch * m.top_k * cfg.dim * rt.compute_bytes
    return [
        Collective("expert counts (fwd)", "all_to_all", "ep", layout.ep, m.n_routed_experts * INT64, forward_calls),
        Collective("dispatch + combine (fwd)", "all_to_all", "ep", layout.ep, rows, 2 * forward_calls),
        Collective("dispatch + combine (bwd)", "all_to_all", "ep", layout.ep, rows, 2 * backward_calls),
    ]


def communication(cfg: ModelConfig, layout: Layout, rt: Runtime) -> dict[str, list[Collective]]:
    return {"dp": data_parallel(cfg, layout, rt), "tp": tensor_parallel(cfg, layout, rt),
            "ep": expert_parallel(cfg, layout, rt)}

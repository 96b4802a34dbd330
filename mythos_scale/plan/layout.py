"""A training layout (how the world is cut, what one micro-batch is) and the runtime facts
the estimates depend on (dtypes, which op implementations run, DeepSpeed's ZeRO knobs).

world = DP x TP; expert parallelism is carved out of DP (EP divides DP, experts' gradients
are reduced over the expert-data-parallel group DP / EP).  TP stays inside a node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mythos_scale.config import Config

# DeepSpeed 0.19 ZeRO defaults for the knobs the estimates read (deepspeed/runtime/zero/config.py).
DS_MULTI_RANK_BUCKET_ALLREDUCE = True


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    ep: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    n_loops: int
    backprop_depth: int
    checkpointing: bool

    @property
    def world(self) -> int:
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: the replicas of one expert shard."""
        return self.dp // self.ep

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def name(self) -> str:
        return (f"dp{self.dp} tp{self.tp} ep{self.ep} zero{self.zero_stage} mb{self.micro_batch} "
                f"ga{self.grad_accum} ckpt {'on' if self.checkpointing else 'off'}")

    def as_dict(self) -> dict[str, Any]:
        return {"dp": self.dp, "tp": self.tp, "ep": self.ep, "edp": self.edp, "zero_stage": self.zero_stage,
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "global_batch": self.global_batch,
                "seq_len": self.seq_len, "n_loops": self.n_loops, "backprop_depth": self.backprop_depth,
                "checkpointing": self.checkpointing}


@dataclass(frozen=True)
class Runtime:
    """How a step runs.  ``device`` and ``fused_kernels`` choose which op implementations'
    saved tensors the activation estimate counts (CUDA's fused RMSNorm keeps x and 1/rms, the
    CPU composite also the normalized x; the fused SwiGLU keeps gate and up, the reference also
    silu(gate))."""

    device: str                       # "cuda" or "cpu"
    compute_bytes: int                # 2 (bf16) or 4 (fp32): weights, gradients, activations
    fused_kernels: bool
    z_loss: bool
    reduce_bucket_size: int           # elements of DeepSpeed's gradient bucket
    multi_rank_bucket_allreduce: bool  # DeepSpeed all-reduces gradient buckets (else reduces to owners)
    overlap_comm: bool                # DeepSpeed reduces gradients on a side stream during backward
    loss_chunk_tokens: int = 0        # train.loss_chunk_tokens: 0 = full logits

    @classmethod
    def from_config(cls, cfg: Config, device: str = "cuda", fused_kernels: bool | None = None) -> Runtime:
        """The runtime ``mythos train`` would use for ``cfg`` on ``device``.  ``fused_kernels``
        None: ``model.kernels`` decides, ``auto`` meaning fused on CUDA (the extension is built
        on GPU machines) and the reference ops on CPU."""
        precision = cfg.train.precision
        bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
        if fused_kernels is None:
            fused_kernels = cfg.model.kernels == "fused" or (cfg.model.kernels == "auto" and device == "cuda")
        zero = {"reduce_bucket_size": cfg.train.reduce_bucket_size, "overlap_comm": cfg.train.overlap_comm,
                **cfg.deepspeed.get("zero_optimization", {})}
        return cls(device=device, compute_bytes=2 if bf16 else 4, fused_kernels=fused_kernels,
                   z_loss=cfg.train.z_loss_coef > 0,
                   reduce_bucket_size=int(zero["reduce_bucket_size"]),
                   multi_rank_bucket_allreduce=bool(zero.get("use_multi_rank_bucket_allreduce",
                                                             DS_MULTI_RANK_BUCKET_ALLREDUCE)),
                   overlap_comm=bool(zero["overlap_comm"]),
                   loss_chunk_tokens=cfg.train.loss_chunk_tokens)


def layout_problems(cfg: Config, layout: Layout, gpus_per_node: int | None = None) -> list[str]:
    """Why ``layout`` cannot run ``cfg`` (empty when it can); memory is checked elsewhere."""
    m, problems = cfg.model, []
    tp, ep, dp = layout.tp, layout.ep, layout.dp
    if gpus_per_node is not None and tp > gpus_per_node:
        problems.append(f"TP {tp} spans nodes (a node has {gpus_per_node} GPUs; TP all-reduces every layer)")
    if m.n_heads % tp:
        problems.append(f"heads {m.n_heads} not divisible by TP {tp}")
    if m.attention.type == "gqa" and m.attention.n_kv_heads % tp:
        problems.append(f"kv heads {m.attention.n_kv_heads} not divisible by TP {tp}")
    if (m.prelude_layers + m.coda_layers > 0 or not m.moe.enabled) and m.dense_ffn_hidden % tp:
        problems.append(f"dense FFN hidden {m.dense_ffn_hidden} not divisible by TP {tp}")
    if m.moe.enabled and m.moe.n_shared_experts and (m.moe.n_shared_experts * m.moe.expert_hidden) % tp:
        problems.append(f"shared-expert hidden {m.moe.n_shared_experts * m.moe.expert_hidden} not divisible by TP {tp}")
    if ep > 1 and not m.moe.enabled:
        problems.append(f"EP {ep} needs MoE (model.moe.enabled is false)")
    if ep > dp:
        problems.append(f"EP {ep} > DP {dp} (EP is carved out of DP)")
    elif dp % ep:
        problems.append(f"EP {ep} does not divide DP {dp}")
    if m.moe.enabled and m.moe.n_routed_experts % ep:
        problems.append(f"experts {m.moe.n_routed_experts} not divisible by EP {ep}")
    if layout.zero_stage not in (1, 2):
        problems.append(f"ZeRO stage {layout.zero_stage} (stages 1 and 2 are supported)")
    if layout.seq_len > m.max_seq_len:
        problems.append(f"seq len {layout.seq_len} > model.max_seq_len {m.max_seq_len}")
    if not 0 <= layout.backprop_depth <= layout.n_loops:
        problems.append(f"backprop depth {layout.backprop_depth} not in [0, loops {layout.n_loops}]")
    if layout.micro_batch < 1 or layout.grad_accum < 1:
        problems.append("micro-batch and gradient accumulation must be >= 1")
    return problems

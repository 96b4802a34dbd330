"""Peak memory of one GPU in a training step, from the config's shapes.

Model state (DeepSpeed ZeRO-1/2, no offload; dense parameters sharded over DP, routed experts
over the expert-data-parallel group DP / EP), per GPU with ``b`` the compute dtype's bytes:

    weights      b x local params                       (bf16 on GPU, fp32 on CPU)
    master       4 x shard                              (DeepSpeed keeps an fp32 partition even in fp32)
    adam         8 x shard                              (exp_avg, exp_avg_sq in fp32)
    gradients    ZeRO-1: b x local params, full gradients on every rank until the step
                 ZeRO-2: b x shard in a partition buffer (two while accumulating micro-batches)
                 either is held through the later micro-batches when accumulating
                 both:   the gradients autograd sums before their hook fires: the looped core's
                         over its k iterations, the tied embedding's from the LM head until the
                         embedding's backward (ZeRO-1: only while accumulating, else they are it)
    bucket       b x reduce_bucket_size (x2 with overlap_comm): DeepSpeed's contiguous gradient
                 bucket, allocated whole at the first gradient hook, plus the flattened copy
                 each bucket all-reduce makes
    step         the largest parameter group's flattened gradient and (bf16) its fp32 copy;
                 on CPU also the two temporaries of torch's unfused AdamW (CUDA's fused has none)

Activations of one micro-batch of N tokens (saved tensors, counted per op from the model's
code; :func:`saved_bytes_per_token` lists them):

- prelude and coda blocks keep their saved tensors;
- the T - k no-grad iterations keep only the current state h;
- with checkpointing each of the k grad iterations keeps its input h (N x D) (and all of them
  the injected input), and the backward recomputes one iteration at a time; without, all k
  iterations keep everything;
- the logits (N x V, compute dtype) live through the whole backward (the step holds the model
  output), the loss keeps log_softmax in fp32 (N x V x 4; the z-loss also the fp32 logits), and
  its backward briefly holds two more fp32 N x V gradients; with ``train.loss_chunk_tokens`` (the
  default) none of these: the chunked loss holds one chunk's logits at a time and stores the
  gradients of the states (N x D) and of the head weight (V x D fp32) (:func:`loss_peak_bytes`);
- MoE dispatch buffers: the expert-sorted copies of the top-k token rows (N k D), the experts'
  hidden activations (N k expert_hidden each) and the sorted and gate-weighted outputs.

The peak is the largest of five moments: the forward, the loss backward, the backward of the
first recomputed core iteration, DeepSpeed's gradient reduction, and the optimizer step.
Estimates count live tensor bytes (what ``torch.cuda.max_memory_allocated`` reports); the
caching allocator's fragmentation and the CUDA context come on top (see ``usable_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mythos_scale.config import ModelConfig
from mythos_scale.plan.layout import Layout, Runtime
from mythos_scale.plan.per_gpu import block_parts, local_params

GIB = 2 ** 30
FP32, INT64 = 4, 8
CUDA_CONTEXT_BYTES = 1 * GIB      # CUDA context, cuBLAS / NCCL workspaces (typical, H100)
ALLOCATOR_HEADROOM = 0.08         # caching-allocator fragmentation, kept free of the estimate


def usable_bytes(memory_gib: float) -> float:
    """What the estimate may fill on a GPU of ``memory_gib``."""
    return memory_gib * GIB * (1 - ALLOCATOR_HEADROOM) - CUDA_CONTEXT_BYTES


# --------------------------------------------------------------------------- activations


def _norm(width: int, rt: Runtime) -> float:
    """An RMSNorm's saved tensors: its input and 1/rms; the CPU composite also the normalized input."""
    b = rt.compute_bytes
    rstd = FP32 if rt.device == "cuda" else b
    return width * b + rstd + (width * b if rt.device != "cuda" else 0)


def _swiglu(hidden: int, rt: Runtime) -> float:
    """gate and up projections, the product (input of the down projection); the reference
    SwiGLU also keeps silu(gate)."""
    return (3 if rt.fused_kernels else 4) * hidden * rt.compute_bytes


def _attention(cfg: ModelConfig, rt: Runtime, core: bool) -> float:
    """Per token, excluding the normalized block input (counted by the block)."""
    b, h, a = rt.compute_bytes, cfg.n_heads, cfg.attention
    lora = cfg.lora_rank * b if core and cfg.lora_rank else 0
    lora_targets = set(cfg.lora_targets) if core else set()
    if a.type == "gqa":
        hd = cfg.dim // h
        # rotated q, repeated k and v, the SDPA output and the output projection's input
        return 5 * h * hd * b + h * FP32 + lora * len(lora_targets & {"q", "kv", "o"})
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.v_head_dim < qk:   # v zero-padded to the query width for the flash kernels
        v_saved, out = h * qk, h * qk
    else:                   # v is a view of the wkv_b output
        v_saved, out = h * (a.qk_nope_head_dim + a.v_head_dim), h * a.v_head_dim
    total = (a.kv_lora_rank + a.qk_rope_head_dim) * b          # wkv_a output (kv_norm's input)
    total += _norm(a.kv_lora_rank, rt) - a.kv_lora_rank * b     # kv_norm: 1/rms (+ normalized)
    total += a.kv_lora_rank * b                                 # normalized c_kv (wkv_b's input)
    if a.q_lora_rank:
        total += _norm(a.q_lora_rank, rt) + a.q_lora_rank * b   # wq_a output, q_norm, its output
    total += (2 * h * qk + v_saved + out) * b + h * FP32        # SDPA: q, k, v, out, logsumexp
    total += h * a.v_head_dim * b                               # wo input
    return total + lora * len(lora_targets & {"q", "kv", "o"})


def _moe(cfg: ModelConfig, rt: Runtime) -> float:
    """Router, dispatch buffers, routed and shared experts, per token."""
    m, b, d = cfg.moe, rt.compute_bytes, cfg.dim
    router = m.n_routed_experts * FP32 + m.top_k * (INT64 + FP32) + FP32   # scores, choice, gates, sum
    if cfg.lora_rank and "router" in cfg.lora_targets:
        router += cfg.lora_rank * b
    if m.aux_loss_coef > 0:
        router += 2 * m.n_routed_experts * FP32
    dispatch = m.top_k * (INT64 + 3 * d * b + FP32)   # token index, sorted rows, outputs, gated outputs, gates
    routed = m.top_k * _swiglu(m.expert_hidden, rt)
    shared = _swiglu(m.n_shared_experts * m.expert_hidden, rt) if m.n_shared_experts else 0
    return router + dispatch + routed + shared


def block_saved(cfg: ModelConfig, rt: Runtime, core: bool) -> float:
    """Saved bytes per token of one block (core: one loop iteration of one core block),
    its input included, its output not (the next consumer counts it)."""
    b, d = rt.compute_bytes, cfg.dim
    total = _norm(d, rt) + d * b                  # attn_norm (input), its output
    total += _attention(cfg, rt, core)
    total += _norm(d, rt) + d * b                 # ffn_norm (the residual sum), its output
    moe = core and cfg.moe.enabled
    total += _moe(cfg, rt) if moe else _swiglu(cfg.dense_ffn_hidden, rt)
    if cfg.sandwich_norm:
        total += 2 * _norm(d, rt)                 # post-norms of the attention and FFN outputs
    return total


def saved_bytes_per_token(cfg: ModelConfig, rt: Runtime) -> dict[str, float]:
    """The activation pieces, bytes per token (see the module doc for which are kept when)."""
    b, d, v = rt.compute_bytes, cfg.dim, cfg.vocab_size
    inject_iteration = (d * b + FP32) if rt.fused_kernels else (d * b + _norm(d, rt))  # h; z (+ norm)
    if cfg.act.enabled:
        inject_iteration += 3 * FP32 + (d * FP32 if b != FP32 else 0)
    return {
        "embedding": INT64,
        "dense_block": block_saved(cfg, rt, core=False),
        "core_iteration": inject_iteration + cfg.core_layers * block_saved(cfg, rt, core=True),
        "state": d * b,
        "injection": 2 * d * FP32,                # B_bar e: its fp32 input and the linear's output
        "injected": d * b,                        # B_bar e as every iteration reads it
        "head": _norm(d, rt) + d * b + INT64,     # final norm, its output, the targets
        "logits": 0 if rt.loss_chunk_tokens else v * b,
        # chunked: the hidden states' gradient, computed in the loss forward, and its scaled copy
        "loss": d * b if rt.loss_chunk_tokens else v * FP32 + (v * FP32 if rt.z_loss and b != FP32 else 0),
        "loss_backward": d * b if rt.loss_chunk_tokens else 2 * v * FP32 + (v * FP32 if rt.z_loss else 0),
    }


def loss_peak_bytes(cfg: ModelConfig, rt: Runtime, n_tokens: int) -> float:
    """The LM head + loss's own peak over a micro-batch of ``n_tokens`` (beyond its input states):
    full logits, or (``rt.loss_chunk_tokens``) the chunked loss's per-token gradient of the states
    plus the head weight's fp32 gradient it stores and the larger of one chunk's logits (fp32, and
    in bf16 the linear's output / the gradient's cast) and the backward's scaled copies."""
    a = saved_bytes_per_token(cfg, rt)
    per_token = n_tokens * (a["logits"] + a["loss"] + a["loss_backward"])
    if not rt.loss_chunk_tokens:
        return per_token
    b, v, d = rt.compute_bytes, cfg.vocab_size, cfg.dim
    narrow = b if b != FP32 else 0
    chunk_logits = min(rt.loss_chunk_tokens, n_tokens) * v * (FP32 + narrow)
    return per_token - n_tokens * a["loss_backward"] + v * d * FP32 + max(
        chunk_logits, n_tokens * a["loss_backward"] + v * d * (FP32 + narrow))


def _backward_workspace(cfg: ModelConfig, rt: Runtime) -> float:
    """Gradients in flight inside one block's backward, per token: the residual stream's and the
    injected input's (accumulated over iterations), and the largest sub-layer's (MoE: the sorted
    rows' and the experts' hidden gradients)."""
    b, d, m = rt.compute_bytes, cfg.dim, cfg.moe
    if m.enabled:
        widest = m.top_k * (2 * d + 3 * m.expert_hidden)
    else:
        widest = 3 * cfg.dense_ffn_hidden
    return (3 * d + widest) * b


# --------------------------------------------------------------------------- the step


@dataclass
class Memory:
    """Bytes per GPU.  ``static`` holds what lives across steps, ``peaks`` the moments of a
    step (each includes ``static``); ``peak`` is their maximum."""

    static: dict[str, float]
    peaks: dict[str, float]
    activations: dict[str, float] = field(default_factory=dict)
    kv_cache_bytes_per_sequence: float = 0.0

    @property
    def static_total(self) -> float:
        return sum(self.static.values())

    @property
    def peak(self) -> float:
        return max(self.peaks.values())

    @property
    def peak_moment(self) -> str:
        return max(self.peaks, key=self.peaks.get)

    def as_dict(self) -> dict:
        return {"static": self.static, "static_total": self.static_total, "peaks": self.peaks,
                "peak": self.peak, "peak_moment": self.peak_moment, "activations": self.activations,
                "kv_cache_bytes_per_sequence": self.kv_cache_bytes_per_sequence}


def estimate_memory(cfg: ModelConfig, layout: Layout, rt: Runtime, kv_bytes_per_token: float = 0.0) -> Memory:
    b, n = rt.compute_bytes, layout.tokens_per_micro_batch
    held = local_params(cfg, layout)
    local, shard = held.total, held.shard
    static = {"weights": local * b, "master_fp32": shard * FP32, "adam_fp32": 2 * shard * FP32}
    if b != FP32:
        static["injection_fp32_copy"] = cfg.dim * cfg.dim * FP32   # B.float(), saved by the injection
    base = sum(static.values())

    # DeepSpeed's gradient buffers (see the module doc)
    bucket = rt.reduce_bucket_size * b * (2 if rt.overlap_comm else 1)
    grads_full, grads_shard = local * b, shard * b
    # Gradients autograd accumulates before their hook fires: the core's over its k iterations,
    # the tied embedding's from the LM head until the embedding lookup's backward.
    core_block = block_parts(cfg, core=True, seq_len=layout.seq_len)[0]
    in_flight = cfg.core_layers * (core_block.split / layout.tp + core_block.replicated
                                   + core_block.routed / layout.ep)
    in_flight += cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0
    accumulating = layout.grad_accum > 1
    # the gradients of earlier micro-batches, held through the next ones' forward and backward
    accumulated = (grads_full if layout.zero_stage == 1 else grads_shard) if accumulating else 0
    if layout.zero_stage == 1:   # full gradients; with accumulation new ones are added into them
        grads_in_backward = grads_full + (in_flight * b if accumulating else 0)
    else:
        # ZeRO-2 copies reduced gradients into a partition buffer, allocated at the first full
        # bucket; with accumulation the previous micro-batches' partition is held beside it
        coda_block = block_parts(cfg, core=False, seq_len=layout.seq_len)[0]
        reduced_before_core = cfg.coda_layers * (coda_block.split / layout.tp + coda_block.replicated)
        grads_in_backward = in_flight * b + grads_shard * (int(accumulating)
                                                           + int(rt.reduce_bucket_size < reduced_before_core))
    # The optimizer steps one parameter group at a time: the largest group's flattened gradient
    # (and its fp32 copy), and on CPU the two temporaries of torch's unfused AdamW.
    no_decay = cfg.vocab_size * cfg.dim + cfg.dim * cfg.dim
    largest_group = max(no_decay / layout.dp, (held.dense - no_decay) / layout.dp
                        if layout.ep > 1 else (local - no_decay) / layout.dp, held.expert / layout.edp)
    step_transient = largest_group * (b + (FP32 if b != FP32 else 0) + (0 if rt.device == "cuda" else 2 * FP32))

    a = saved_bytes_per_token(cfg, rt)
    k = layout.backprop_depth
    ckpt = layout.checkpointing and k > 0
    iteration = a["core_iteration"]
    per_grad_iteration = a["state"] if ckpt else iteration
    block_work = iteration / cfg.core_layers          # the live tensors of one block's forward
    before_core = (a["embedding"] + cfg.prelude_layers * a["dense_block"] + a["injection"]
                   + (a["injected"] if ckpt else 0))   # held by the checkpoints as their input
    after_core = a["state"] + cfg.coda_layers * a["dense_block"] + a["head"]
    held_logits = a["logits"]                         # the step holds the model output
    prev_logits = a["logits"] if layout.grad_accum > 1 else 0

    peaks = {
        "forward": base + accumulated + n * (before_core + k * per_grad_iteration + a["state"] + block_work
                                             + prev_logits),
        "loss_backward": base + accumulated + n * (before_core + k * per_grad_iteration + after_core)
        + loss_peak_bytes(cfg, rt, n),
        "core_backward": base + bucket + grads_in_backward
        + n * (before_core + (k - 1) * per_grad_iteration + iteration + held_logits
               + _backward_workspace(cfg, rt)) if k else 0.0,
        "gradient_reduction": base + bucket + n * held_logits
        + (grads_full if layout.zero_stage == 1 else grads_shard + min(rt.reduce_bucket_size * b, grads_full)),
        "optimizer_step": base + grads_shard + step_transient + n * held_logits,
    }
    activations = {name: value * n for name, value in a.items()}
    activations["kept_after_forward"] = n * (before_core + k * per_grad_iteration + after_core + a["loss"])
    return Memory(static=static, peaks=peaks, activations=activations,
                  kv_cache_bytes_per_sequence=kv_bytes_per_token * layout.seq_len)

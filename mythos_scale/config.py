"""One configuration schema for the whole system, validated when it is loaded.

A config is a YAML file whose sections mirror the classes below (``model``, ``data``,
``train``, ``parallel``, ``deepspeed``).  Command-line overrides are dotted assignments
(``model.dim=768 train.max_steps=10``) whose values are parsed as YAML scalars.

Every mistake is reported as :class:`ConfigError` naming the dotted key that is wrong:
unknown keys, wrong types and impossible shapes (heads not dividing dim, top_k larger
than the number of experts, an odd rope dimension, ...).
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the source."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


# --------------------------------------------------------------------------- model


class AttentionConfig(_Strict):
    """MLA (DeepSeek-V2) or GQA.  For MLA, ``q_lora_rank = 0`` means no query compression."""

    type: Literal["mla", "gqa"] = "mla"
    q_lora_rank: int = Field(0, ge=0)
    kv_lora_rank: int = Field(64, ge=1)
    qk_nope_head_dim: int = Field(32, ge=1)
    qk_rope_head_dim: int = Field(16, ge=2)
    v_head_dim: int = Field(32, ge=1)
    n_kv_heads: int = Field(1, ge=1)  # GQA only
    rope_theta: float = Field(10000.0, gt=0)
    # Packed sequences: a token attends only within its document (ended by the data's EOS token).
    document_mask: bool = True
    # Document-masked attention: flash-attn's varlen kernel on CUDA when installed (auto), or SDPA.
    kernel: Literal["auto", "flash", "sdpa"] = "auto"


class MoEConfig(_Strict):
    """DeepSeekMoE in the core: fine-grained routed experts + always-on shared experts."""

    enabled: bool = True
    n_routed_experts: int = Field(8, ge=1)
    n_shared_experts: int = Field(1, ge=0)
    top_k: int = Field(2, ge=1)
    expert_hidden: int = Field(128, ge=1)
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    route_scale: float = Field(1.0, gt=0)
    # Per-depth routing: a learned per-loop-iteration bias on the router logits, and a balancing
    # bias per iteration.  False: one balancing bias for all iterations, so routing is the same
    # function at every depth (with lora_rank 0 and loop_embedding none, so is the whole core).
    depth_routing: bool = True
    # DeepSeek-V3 auxiliary-loss-free balancing: bias_i -/+= gamma after each step.
    balance_update_rate: float = Field(1e-3, ge=0)
    # Optional sequence-level balance loss (0 disables it).
    aux_loss_coef: float = Field(0.0, ge=0)


# The largest A_bar bound allowed: bfloat16 (spacing 2^-8 below 1) rounds every float32 from
# 1 - 2^-9 = 0.998046875 up to 1.0.
A_BAR_MAX_LIMIT = 0.998


class InjectionConfig(_Strict):
    """Parcae LTI injection ``z = A_bar * h + B_bar e`` with ``B_bar = dt * B`` and
    ``A_bar = a_bar_min + (a_bar_max - a_bar_min) * exp(-dt * exp(A_log))``, ``dt = softplus(dt_bias)``."""

    a_log_init: float = 0.0
    dt_init: float = Field(0.5, gt=0)
    # Bounds of A_bar, approached smoothly (A_log keeps a gradient near them).  a_bar_max must stay
    # below 1.0 after rounding to bf16, or the recurrence could stop contracting in bf16 compute.
    a_bar_max: float = Field(0.99, gt=0, lt=1)
    a_bar_min: float = Field(1e-4, ge=0, lt=1)
    # Training starts the recurrence from h_0 ~ N(0, state_init_std^2) (Huginn, Parcae), so the
    # core learns to reach its state from anywhere near 0; inference starts from h_0 = 0.
    state_init_std: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> InjectionConfig:
        _require(self.a_bar_max <= A_BAR_MAX_LIMIT, "model.injection.a_bar_max",
                 f"{self.a_bar_max} rounds to 1.0 in bfloat16 (spacing 2^-8 below 1), so A_bar could reach 1 "
                 f"and the state stop contracting; use at most {A_BAR_MAX_LIMIT}")
        _require(self.a_bar_min < self.a_bar_max, "model.injection.a_bar_min",
                 f"({self.a_bar_min}) must be below model.injection.a_bar_max ({self.a_bar_max})")
        return self


class ACTConfig(_Strict):
    """Adaptive Computation Time (Graves 2016) over loop iterations."""

    enabled: bool = False
    ponder_cost: float = Field(1e-3, ge=0)
    threshold: float = Field(0.99, gt=0, le=1)
    halt_bias_init: float = -2.0


class ModelConfig(_Strict):
    vocab_size: int = Field(4096, ge=2)
    dim: int = Field(256, ge=1)
    n_heads: int = Field(4, ge=1)
    prelude_layers: int = Field(1, ge=0)
    core_layers: int = Field(2, ge=1)
    coda_layers: int = Field(1, ge=0)
    max_loops: int = Field(8, ge=1)
    max_seq_len: int = Field(256, ge=1)
    dense_ffn_hidden: int = Field(512, ge=1)
    lora_rank: int = Field(8, ge=0)
    lora_targets: list[Literal["q", "kv", "o", "router"]] = ["q", "o"]
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-6, gt=0)
    sandwich_norm: bool = False
    # RMSNorm on the loop's final state before the coda: the coda then reads h_T at one scale
    # whatever T (||h_T|| grows with T past the training mean).  Adds a (dim,) weight.
    coda_norm: bool = False
    loop_embedding: Literal["sinusoidal", "learned", "none"] = "sinusoidal"
    # Initial scale of the loop embedding (sinusoidal: its per-channel gain; learned: the table's
    # std); None: init_std / 10.
    loop_embedding_init: float | None = Field(None, ge=0)
    init_std: float = Field(0.02, gt=0)
    activation_checkpointing: bool = True
    # Which implementation of the fused ops to use (see mythos_scale.kernels).
    kernels: Literal["auto", "fused", "reference"] = "auto"
    # torch.compile each Prelude / Core / Coda block (mythos_scale/parallel/compile.py); for GPU
    # runs: the first steps pay the compile (about a minute per block shape on CPU).
    compile: bool = False
    attention: AttentionConfig = AttentionConfig()
    moe: MoEConfig = MoEConfig()
    injection: InjectionConfig = InjectionConfig()
    act: ACTConfig = ACTConfig()

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        a, m = self.attention, self.moe
        _require(a.qk_rope_head_dim % 2 == 0, "model.attention.qk_rope_head_dim",
                 f"must be even for rotary embeddings, got {a.qk_rope_head_dim}")
        if a.type == "gqa":
            _require(self.dim % self.n_heads == 0, "model.n_heads",
                     f"n_heads ({self.n_heads}) must divide model.dim ({self.dim}) for GQA")
            _require(self.n_heads % a.n_kv_heads == 0, "model.attention.n_kv_heads",
                     f"n_kv_heads ({a.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
            _require((self.dim // self.n_heads) % 2 == 0, "model.dim",
                     "dim / n_heads must be even for rotary embeddings")
        _require(m.top_k <= m.n_routed_experts, "model.moe.top_k",
                 f"top_k ({m.top_k}) must be <= model.moe.n_routed_experts ({m.n_routed_experts})")
        if self.lora_rank > 0:
            _require(self.lora_rank <= self.dim, "model.lora_rank",
                     f"lora_rank ({self.lora_rank}) must be <= model.dim ({self.dim})")
        return self


# --------------------------------------------------------------------------- data


class DataSource(_Strict):
    """One prepared dataset (a folder of MDS shards with a manifest) and its blend weight."""

    path: str
    weight: float = Field(1.0, gt=0)


class DataStage(_Strict):
    """From optimizer step ``start_step`` on, the training stream reads these sources instead."""

    start_step: int = Field(ge=1)
    sources: list[DataSource] = Field(min_length=1)


class DataConfig(_Strict):
    # "embedded" = the default corpus (Python standard library sources), prepared on demand.
    sources: list[DataSource] = [DataSource(path="embedded")]
    # Later data mixes (data.sources is the mix from step 0), in the order they start; a stage may
    # be added on resume, starting at the resume step or later (see mythos_scale.data.stages).
    stages: list[DataStage] = []
    val_path: str | None = None  # defaults to the val split of the first source
    cache_dir: str = "~/.cache/mythos_scale"
    seq_len: int = Field(256, ge=1)
    shuffle_seed: int = 1234
    num_workers: int = Field(0, ge=0)
    # Before reading local shards, check them against their index and the manifest: "size" (a stat
    # per shard), "hash" (also the xxh64 of every shard, on every start: a full read of the data)
    # or "hash_once" (the xxh64 the first time, then again only for shards whose size or mtime
    # changed).  Remote shards are hashed on download.
    verify_shards: Literal["size", "hash", "hash_once"] = "size"

    @model_validator(mode="after")
    def _stages_in_order(self) -> DataConfig:
        for i in range(1, len(self.stages)):
            before, this = self.stages[i - 1].start_step, self.stages[i].start_step
            _require(this > before, f"data.stages.{i}.start_step",
                     f"({this}) must be after data.stages.{i - 1}.start_step ({before}): list the stages in "
                     f"the order they start")
        return self


# --------------------------------------------------------------------------- train


class LoopSchedule(_Strict):
    """Per-step loop count T (identical on every rank) and the truncated-backprop depth k."""

    sampler: Literal["fixed", "poisson", "poisson_lognormal"] = "fixed"
    mean: int = Field(4, ge=1)
    min: int = Field(1, ge=1)
    max: int = Field(8, ge=1)
    backprop_depth: int = Field(4, ge=1)  # k: gradients flow through the last k iterations
    lognormal_sigma: float = Field(0.5, gt=0)
    # The LM loss is the mean of the losses of the coda's predictions from each of the k
    # grad-carrying iterations (not only the last): every iteration is asked to predict, as in
    # Ouro's loss over exit steps.  Costs k coda + head passes per step.  Not with ACT.
    window_loss: bool = False

    @model_validator(mode="after")
    def _range(self) -> LoopSchedule:
        _require(self.min <= self.mean <= self.max, "train.loops.mean",
                 f"need train.loops.min ({self.min}) <= mean ({self.mean}) <= max ({self.max})")
        return self


class CheckpointConfig(_Strict):
    every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    # Write in a background thread while training goes on: the step loop waits only for a copy of
    # this rank's state to host memory.  false: write before the next step (same files).
    async_save: bool = True
    # Seconds between SIGTERM and SIGKILL (Slurm's KillWait, default 30 s).  On SIGTERM a save is
    # made only if it fits, as estimated from the last save; otherwise the last committed
    # checkpoint is kept (the log says which).  SIGUSR1 (Slurm's pre-timeout signal) and Ctrl-C
    # always save.
    grace_s: float = Field(30.0, gt=0)
    # Cap on each rank's write rate in MB/s (0: none), e.g. to leave a shared file system's
    # bandwidth to the data loaders while a checkpoint is written in the background.
    write_limit_mb_s: float = Field(0.0, ge=0)


class WandbConfig(_Strict):
    """Weights & Biases on the main rank, beside TensorBoard (see mythos_scale.train.wandb_log)."""

    project: str = "mythos_scale"
    entity: str | None = None
    name: str | None = None  # the W&B run's display name; None: train.name
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: list[str] = []


class ProfileConfig(_Strict):
    """torch.profiler traces of optimizer steps start_step..end_step (1-based, as logged) on the
    given ranks, under <run>/profile/ (see mythos_scale.train.profiling)."""

    start_step: int = Field(1, ge=1)
    end_step: int = Field(1, ge=1)
    ranks: list[Annotated[int, Field(ge=0)]] = [0]
    # CUDA only: record the allocator's history over the same steps and dump it as a snapshot
    # (https://pytorch.org/memory_viz), and on an out-of-memory error inside them.
    memory_snapshot: bool = False

    @model_validator(mode="after")
    def _order(self) -> ProfileConfig:
        _require(self.start_step <= self.end_step, "train.profile.end_step",
                 f"({self.end_step}) is before train.profile.start_step ({self.start_step})")
        return self


class TrainConfig(_Strict):
    name: str = "mythos"
    out_dir: str = "runs"
    seed: int = 0
    max_steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)  # WSD: final fraction spent decaying
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)
    # LM head + cross-entropy over this many tokens at a time (never the full fp32 logits; on CUDA
    # liger-kernel's fused kernel when installed); 0: the full logits at once.
    loss_chunk_tokens: int = Field(2048, ge=0)
    # ZeRO-3 is refused: the looped core reads shared weights outside module hooks (tied head,
    # stacked experts, injection), which stage 3's parameter gathering does not see.
    zero_stage: int = Field(1, ge=1, le=2)
    # ZeRO-1/2 reduce gradient buckets during backward (DeepSpeed overlap_comm; on GPU a side
    # stream, at the cost of a second bucket) instead of all at the end.  The bucket holds this
    # many elements: larger buckets mean fewer, better-sized collectives and more memory.
    overlap_comm: bool = True
    reduce_bucket_size: int = Field(500_000_000, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    loops: LoopSchedule = LoopSchedule()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0 disables periodic validation
    eval_batches: int = Field(4, ge=1)
    # Loop counts the periodic validation also runs at (TensorBoard val/loss_at_loops/T<n>, one
    # scalar per count): the loss-vs-loops curve, watched live.  val/loss stays at loops.mean.
    eval_loops: list[Annotated[int, Field(ge=1)]] = []
    max_nonfinite_steps: int = Field(5, ge=1)
    # Stop (after saving) once this process has run this many steps; 0 = no limit.  For
    # allocations shorter than the run: the next job resumes where this one stopped.
    exit_after_steps: int = Field(0, ge=0)
    # Peak FLOP/s of one device for MFU; 0 = a built-in table on GPU, a measured matmul on CPU.
    peak_tflops: float = Field(0.0, ge=0)
    # When the run folder has checkpoints but none is usable (all damaged), start again from
    # step 0 instead of refusing; what the folder held is moved to previous/<time>/.  Has no
    # effect while a usable checkpoint exists (a requeued job keeping this set loses nothing).
    restart: bool = False
    wandb: WandbConfig | None = None  # None: no W&B (TensorBoard and metrics.jsonl always)
    profile: ProfileConfig | None = None  # None: no profiling
    # Start from another model's weights (a run folder, a checkpoint or an export folder): weights
    # only, the optimizer, data order and step start fresh.  Not used once this run has a checkpoint.
    init_from: str | None = None


class ParallelConfig(_Strict):
    """world = DP x TP; EP is carved out of DP (see mythos_scale.parallel.distributed)."""

    tp: int = Field(1, ge=1)  # tensor parallelism: attention heads and dense/shared FFNs split
    ep: int = Field(1, ge=1)  # expert parallelism: routed experts partitioned over ep ranks
    # A collective that waits longer fails (NCCL: with a flight-recorder dump) instead of hanging.
    timeout_minutes: float = Field(20.0, gt=0)
    # auto: the GPU when CUDA works, else the CPU, but an error when GPUs were allocated and CUDA
    # cannot use them; cpu: the CPU on purpose; cuda: an error without a usable GPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Every this many steps, check that the TP ranks' replicated parameters are bit-identical
    # (mythos_scale/parallel/replicas.py: two small collectives); 0 never checks.
    tp_check_every: int = Field(100, ge=0)


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    # Extra DeepSpeed settings merged over the ones derived from `train` (expert use only).
    deepspeed: dict[str, Any] = {}

    @model_validator(mode="after")
    def _cross(self) -> Config:
        _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                 f"seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        _require(not (self.train.loops.window_loss and self.model.act.enabled), "train.loops.window_loss",
                 "cannot be combined with model.act.enabled (ACT's coda reads the halting-weighted sum)")
        _require(self.train.loops.max <= self.model.max_loops, "train.loops.max",
                 f"({self.train.loops.max}) exceeds model.max_loops ({self.model.max_loops})")
        _require(self.train.global_batch_size % self.train.micro_batch_size == 0,
                 "train.global_batch_size",
                 f"({self.train.global_batch_size}) must be a multiple of "
                 f"train.micro_batch_size ({self.train.micro_batch_size})")
        self._parallel_fits_model()
        return self

    def _parallel_fits_model(self) -> None:
        """What tp and ep require of the model (what they require of the world: check_layout)."""
        m, tp, ep = self.model, self.parallel.tp, self.parallel.ep
        if ep > 1:
            _require(m.moe.enabled, "parallel.ep", f"ep ({ep}) > 1 needs model.moe.enabled (no experts to partition)")
            _require(m.moe.n_routed_experts % ep == 0, "parallel.ep",
                     f"ep ({ep}) must divide model.moe.n_routed_experts ({m.moe.n_routed_experts})")
        if tp == 1:
            return
        _require(m.attention.type == "mla", "parallel.tp",
                 f"tp ({tp}) > 1 is implemented for model.attention.type=mla only, not {m.attention.type}")
        _require(m.n_heads % tp == 0, "parallel.tp", f"tp ({tp}) must divide model.n_heads ({m.n_heads})")
        ffns = {}
        if m.prelude_layers + m.coda_layers > 0 or not m.moe.enabled:
            ffns["model.dense_ffn_hidden"] = m.dense_ffn_hidden
        if m.moe.enabled and m.moe.n_shared_experts:
            ffns["model.moe.n_shared_experts x expert_hidden"] = m.moe.n_shared_experts * m.moe.expert_hidden
        for key, hidden in ffns.items():
            _require(hidden % tp == 0, "parallel.tp", f"tp ({tp}) must divide {key} ({hidden})")


def layout_problem(world_size: int, tp: int, ep: int) -> str | None:
    """Why ``world_size`` ranks cannot be laid out as world = DP x TP with EP carved out of DP
    (None when they can).  What tp and ep require of the model is checked at load (Config)."""
    if world_size % tp:
        return (f"parallel.tp={tp} does not divide the world size {world_size} "
                f"(world = data-parallel x tensor-parallel)")
    dp = world_size // tp
    if ep > dp:
        return (f"parallel.ep={ep} exceeds the data-parallel size {dp} (world {world_size} / tp {tp}): "
                f"expert parallelism is carved out of data parallelism, so ep <= {dp}")
    if dp % ep:
        return (f"parallel.ep={ep} does not divide the data-parallel size {dp} (world {world_size} / tp {tp}): "
                f"expert parallelism is carved out of data parallelism")
    return None


# --------------------------------------------------------------------------- loading


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class inside a field's annotation (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _nearest_key(loc: tuple) -> str | None:
    """The closest valid key to the unknown last part of ``loc`` in its section, if one is close."""
    section: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: the section stays the item's class
            continue
        field = section.model_fields.get(part) if section is not None else None
        section = _section_model(field.annotation) if field is not None else None
        if section is None:
            return None
    matches = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            nearest = _nearest_key(e["loc"])
            msg = "unknown key" + (f" (did you mean {'.'.join(map(str, e['loc'][:-1] + (nearest,)))}?)"
                                   if nearest else "")
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return f"invalid config ({source}):\n" + "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b.c=value`` assignments applied (values as YAML); a
    number addresses an item of a list that is already there (``data.sources.0.weight=2``)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {exc}") from None
        node: Any = out
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:depth])
                    raise ConfigError(f"override {key}: {where} is a list of {len(node)} item(s) here; "
                                      f"address an item by its index 0..{len(node) - 1}, not {part!r}")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:depth])} is not a section")
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    return out


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    return config_from_dict(raw, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""The DeepSpeed / ZeRO wrapping: the engine over a model that TP and EP already sharded.

DeepSpeed is told the layout in two ways:

- tensor parallelism through its ``mpu`` argument (``MegatronMPU``, megatron-core's
  ``parallel_state`` under the names DeepSpeed reads): ZeRO then partitions and reduces over the
  data-parallel group of each TP rank, counts TP-sharded parameters (``tensor_model_parallel``)
  once per TP rank in the gradient norm, and writes one model file per TP rank
  (:mod:`mythos_scale.parallel.mpu`; imported only then, megatron-core takes seconds to load);
- expert parallelism through its MoE path.  DeepSpeed's engine takes that path only when a module
  is an instance of its own ``deepspeed.moe.layer.MoE``; expert parameters are those with
  ``allreduce = False`` and a ``group_name``, kept by the optimizer in param groups marked
  ``moe``.  ZeRO then partitions and reduces their gradients over the expert-data-parallel group
  only, and the engine's start-up broadcast sends them within that group.  Without it ZeRO's
  reduce-scatter over the whole data-parallel group would average the gradients of *different*
  experts held by different EP ranks (and the start-up broadcast from DP rank 0 would overwrite
  each EP rank's experts with rank 0's): silent corruption (tests/test_parallel_equality.py shows it).
  So :func:`declare_experts` makes our expert modules DeepSpeed MoE layers (a subclass of both,
  as FSDP2's ``fully_shard`` swaps a module's class), registers our EP / EDP groups under
  DeepSpeed's group name, and marks their parameters.

DeepSpeed's MoE checkpoint code assumes its own per-expert module naming
(``deepspeed_moe.experts.deepspeed_experts.<i>``) and cannot save stacked expert weights, so once
the optimizer is built the engine's ``has_moe_layers`` is turned off.  Checkpoints do not go
through DeepSpeed at all: :mod:`mythos_scale.checkpoint` writes each rank's pieces of the
logical tensors (every EP rank's experts included) and reads them back in any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import deepspeed
import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups as deepspeed_groups

from mythos_scale.config import Config, ConfigError
from mythos_scale.parallel.distributed import ParallelLayout
from mythos_scale.parallel.ep import ExpertParallelExperts
from mythos_scale.parallel.precision import (
                                             check_deepspeed_config,
                                             check_engine_precision,
                                             deepspeed_precision,
                                             refresh_fp32_values,
                                             uses_bf16,
)


def deepspeed_config(cfg: Config, layout: ParallelLayout) -> dict[str, Any]:
    t = cfg.train
    per_step = t.micro_batch_size * layout.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {layout.dp})")
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": t.overlap_comm,
                              "reduce_bucket_size": t.reduce_bucket_size, "allgather_bucket_size": t.reduce_bucket_size},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        **deepspeed_precision(uses_bf16(cfg, layout.device), t.zero_stage),
    }
    ds = _deep_merge(ds, cfg.deepspeed)
    check_deepspeed_config(ds, t.zero_stage)
    return ds


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedExperts(ExpertParallelExperts, DeepSpeedMoE):
    """Our expert-parallel experts, declared a DeepSpeed MoE layer (see the module docstring).
    ``DeepSpeedMoE.__init__`` is never run: the engine reads only the attributes set by
    :func:`declare_experts`."""

    num_local_experts: int
    expert_group_name: str

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine on MoE layers to create their groups: ours exist already."""


def expert_group_name(layout: ParallelLayout) -> str:
    return f"ep_size_{layout.ep}"  # DeepSpeed's naming: group dicts and optimizer groups use it


def declare_experts(model: nn.Module, layout: ParallelLayout) -> None:
    """Register the layout's EP / EDP groups with DeepSpeed and make every expert-parallel module a
    DeepSpeed MoE layer whose parameters are expert parameters of that group."""
    name = expert_group_name(layout)
    for kind, group in (("EXPERT_PARALLEL", layout.ep_group), ("EXPERT_DATA_PARALLEL", layout.edp_group)):
        getattr(deepspeed_groups, f"_{kind}_GROUP")[name] = group
        getattr(deepspeed_groups, f"_{kind}_GROUP_RANKS")[name] = torch.distributed.get_process_group_ranks(group)
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            module.__class__ = DeepSpeedExperts
            module.num_local_experts = module.w_gate.shape[0]
            module.expert_group_name = name
            for param in module.parameters():
                param.allreduce = False
                param.group_name = name


def split_expert_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Move expert parameters out of each param group into a twin group marked ``moe`` (same
    hyperparameters), as DeepSpeed's ZeRO requires; done before the first step."""
    for group in list(optimizer.param_groups):
        experts = [p for p in group["params"] if is_moe_param(p)]
        if not experts:
            continue
        group["params"] = [p for p in group["params"] if not is_moe_param(p)]
        settings = {k: v for k, v in group.items() if k != "params"}
        optimizer.add_param_group({**settings, "params": experts, "name": experts[0].group_name, "moe": True})


def apply_zero(model: nn.Module, cfg: Config, layout: ParallelLayout,
               make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> deepspeed.DeepSpeedEngine:
    """Wrap the (already TP/EP-sharded) model in a DeepSpeed engine with ZeRO ``train.zero_stage``."""
    expert_parallel = layout.ep > 1
    if expert_parallel:
        declare_experts(model, layout)
    optimizer = make_optimizer(model)
    if expert_parallel:
        split_expert_param_groups(optimizer)
    mpu = None
    if layout.tp > 1:
        from mythos_scale.parallel.mpu import MegatronMPU

        mpu = MegatronMPU()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                           config=deepspeed_config(cfg, layout))
    engine.has_moe_layers = False  # its MoE checkpoint code cannot save our experts: see the module docstring
    bf16 = uses_bf16(cfg, layout.device)
    check_engine_precision(engine, bf16)
    refresh_fp32_values(engine, bf16)
    return engine


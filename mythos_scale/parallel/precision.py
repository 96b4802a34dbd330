"""The precision policy under the DeepSpeed engine, stated once and checked at start-up.

At ``precision=bf16`` (the GPU default):

====================================  ==========  ============================================
what                                  dtype       why
====================================  ==========  ============================================
every parameter, as the engine holds  bf16        DeepSpeed casts each one (``p.data = p.data.to``)
it (forward / backward weights)                   and flattens one dtype per ZeRO group
master weights and Adam moments       fp32        DeepSpeed's ZeRO-1/2 optimizer, partitioned
injection ``a_log``, ``dt_bias``:     fp32        they set the per-channel decay A_bar, felt over
values the model computes with                    every loop; bf16's 8 bits would round a_log by
                                                  up to 0.4%.  Read from the fp32 master after each
                                                  step (:func:`refresh_fp32_values`, one small
                                                  all-reduce each), gradient still flows to the
                                                  bf16 parameter.  ``B`` is a matrix like every
                                                  other weight: bf16, its product taken in fp32
MoE ``balance_bias``                  fp32        a buffer, never cast by DeepSpeed (moved by a
                                                  sign rule at rate ~1e-3: bf16 would stall it)
gradient reduction                    fp32        ``communication_data_type``: a sum over
                                                  hundreds of ranks in bf16 loses the small ones
gradient accumulation (micro-batches) fp32 ZeRO-2 ``data_types.grad_accum_dtype``; under ZeRO-1
                                      bf16 ZeRO-1 DeepSpeed would switch to its BF16_Optimizer
                                                  (which our checkpoint code does not read and which
                                                  does not reduce expert gradients over their group),
                                                  so ZeRO-1 keeps bf16 accumulation and that
                                                  override is refused: use ZeRO-2 for long
                                                  accumulation
loss (cross-entropy, z-loss)          fp32        logits cast up before the softmax (trainer)
====================================  ==========  ============================================

At fp32 everything is fp32.  :func:`check_engine_precision` fails with a :class:`PrecisionError`
(exit 2) naming the first parameter or setting that differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mythos_scale.config import Config, ConfigError
from mythos_scale.model.recurrence import LTIInjection


class PrecisionError(ConfigError):
    """A parameter or engine setting whose dtype differs from the precision policy (exit 2)."""


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    t = cfg.train
    return t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")


def deepspeed_precision(bf16: bool, zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed settings of the policy (merged under ``cfg.deepspeed``'s overrides)."""
    if not bf16:
        return {"bf16": {"enabled": False}}
    return {"bf16": {"enabled": True, "check_grad_overflow": True},
            "communication_data_type": "fp32",
            "data_types": {"grad_accum_dtype": "fp32" if zero_stage == 2 else "bf16"}}


def check_deepspeed_config(ds: dict[str, Any], zero_stage: int) -> None:
    """Refuse the DeepSpeed settings that break the policy or our checkpoint code."""
    if not ds.get("bf16", {}).get("enabled"):
        return
    accum = str(ds.get("data_types", {}).get("grad_accum_dtype", "bf16")).lower()
    if zero_stage == 1 and accum in ("fp32", "float32", "float"):
        raise PrecisionError(
            "deepspeed.data_types.grad_accum_dtype=fp32 with train.zero_stage=1 and bf16: DeepSpeed would switch "
            "to its BF16_Optimizer, which mythos checkpoints cannot save and which does not reduce expert "
            "gradients over their group; use train.zero_stage=2 for fp32 gradient accumulation")
    comm = str(ds.get("communication_data_type", "fp32")).lower()
    if comm not in ("fp32", "float32", "float"):
        raise PrecisionError(f"deepspeed.communication_data_type={comm}: the precision policy reduces gradients in "
                             "fp32 (mythos_scale/parallel/precision.py); remove the override")


def expected_param_dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def check_engine_precision(engine: Any, bf16: bool) -> None:
    """Every parameter, buffer and reduction setting of ``engine`` as the policy says, else
    :class:`PrecisionError` naming the first that is not."""
    want = expected_param_dtype(bf16)
    for name, param in engine.module.named_parameters():
        if param.dtype != want:
            raise PrecisionError(f"parameter {name} is {param.dtype}, the precision policy wants {want} "
                                 f"(train.precision={'bf16' if bf16 else 'fp32'}); something cast it behind "
                                 "the model's back")
    for name, buf in engine.module.named_buffers():
        if name.endswith("balance_bias") and buf.dtype != torch.float32:
            raise PrecisionError(f"buffer {name} is {buf.dtype}, the precision policy keeps it float32")
    if engine.communication_data_type != torch.float32:
        raise PrecisionError(f"gradient reduction dtype is {engine.communication_data_type}, the policy wants fp32")
    accum = getattr(engine.optimizer, "gradient_accumulation_dtype", None)
    if accum is None:
        raise PrecisionError(f"the engine's optimizer is {type(engine.optimizer).__name__}, not DeepSpeed's "
                             "ZeRO-1/2 optimizer that mythos checkpoints read")


def dtype_table(engine: Any) -> dict[str, str]:
    """Parameter / setting -> dtype, for reports and tests."""
    table = {name: str(p.dtype).removeprefix("torch.") for name, p in engine.module.named_parameters()}
    table["<gradient reduction>"] = str(engine.communication_data_type).removeprefix("torch.")
    table["<gradient accumulation>"] = str(engine.optimizer.gradient_accumulation_dtype).removeprefix("torch.")
    return table


def refresh_fp32_values(engine: Any, bf16: bool) -> None:
    """Give each injection the fp32 master values of its decay parameters (a collective over the
    data-parallel group: every rank calls it after each optimizer step and after a load)."""
    if not bf16:
        return
    from deepspeed.utils import safe_get_full_fp32_param

    for module in engine.module.modules():
        if isinstance(module, LTIInjection):
            module.fp32_values = {name: safe_get_full_fp32_param(getattr(module, name))
                                  for name in LTIInjection.FP32_VALUES}


def injection_modules(model: nn.Module) -> list[LTIInjection]:
    return [m for m in model.modules() if isinstance(m, LTIInjection)]

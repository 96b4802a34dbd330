"""The parallelize step: a plain built model, the config and the layout in, a DeepSpeed engine out.

The model is plain PyTorch and runs as one process with no process group; only this pass knows
about ranks.  It applies, in order (as torchtitan's ``parallelize`` does):

1. tensor parallelism (:mod:`mythos_scale.parallel.tp`): attention heads and dense / shared
   FFNs split over the TP group;
2. expert parallelism (:mod:`mythos_scale.parallel.ep`): routed experts partitioned over the EP
   group, with all-to-all dispatch;
3. ``torch.compile`` of each block when ``model.compile`` is set
   (:mod:`mythos_scale.parallel.compile`), over the TP / EP modules;
4. the DeepSpeed / ZeRO wrapping (:mod:`mythos_scale.parallel.zero`), told about TP and EP.

Every rank builds the same full model from the same seed first, so each shard is exactly the
single-process model's slice; sharded parameters carry a
:class:`~mythos_scale.parallel.shard.ShardSpec` and keep their names.
"""

from __future__ import annotations

from collections.abc import Callable

import deepspeed
import torch
import torch.nn as nn

from mythos_scale.config import Config
from mythos_scale.parallel.compile import compile_blocks
from mythos_scale.parallel.distributed import ParallelLayout
from mythos_scale.parallel.ep import apply_ep
from mythos_scale.parallel.tp import apply_tp
from mythos_scale.parallel.zero import apply_zero


def parallelize(model: nn.Module, cfg: Config, layout: ParallelLayout,
                make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> deepspeed.DeepSpeedEngine:
    """Shard ``model`` in place for ``layout`` and return its DeepSpeed engine; ``make_optimizer``
    builds the optimizer over the sharded model's parameters."""
    apply_tp(model, layout)
    apply_ep(model, layout)
    if cfg.model.compile:
        compile_blocks(model)
    return apply_zero(model, cfg, layout, make_optimizer)

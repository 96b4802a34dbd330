"""``torch.compile`` of the model's blocks (``model.compile``), a step of the parallelize pass.

Each Prelude, Core and Coda block is compiled on its own, after TP and EP have replaced its
modules (torchtitan's per-block scheme): the looped Core's blocks run T times per forward with
the same shapes, so their graphs serve every iteration, and the pieces that cannot be traced
stay between graphs instead of failing the model: the per-iteration activation checkpoint
(:func:`torch.utils.checkpoint` around the whole iteration, outside the blocks), the EP
all-to-all with its host-read split sizes, and the per-expert loop where ``grouped_mm`` has no
kernel for the dtype (fp32; under compile the MoE takes the grouped GEMM for bf16 only, the
kernel's own rule on GPU).  Each such cut is a graph break: :func:`graph_breaks` counts them and
the trainer logs the count (``compile/graph_breaks``) so a new one shows up in TensorBoard.
"""

from __future__ import annotations

import torch.nn as nn


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every Prelude, Core and Coda block of ``model`` in place (``nn.Module.compile``:
    names, parameters and state dicts are unchanged, so checkpoints and ZeRO see the same model).
    The kernel choice for the parameters' device is made (and logged) here, before tracing: a log
    call inside a compiled block would be a graph break.  ``backend``: dynamo's backend
    (``aot_eager`` traces without generating code, as the meta-device test does)."""
    model.kernels.implementation(next(model.parameters()).device.type)
    for blocks in (model.prelude, model.core, model.coda):
        for block in blocks:
            block.compile(backend=backend)


def graph_breaks() -> dict[str, int]:
    """Graph breaks met so far in this process, by reason (first line of dynamo's explanation)."""
    from torch._dynamo.utils import counters

    out: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        first = reason.strip().splitlines()[0]
        out[first] = out.get(first, 0) + count
    return out


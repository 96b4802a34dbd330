"""``mythos plan``: parameter and FLOP counts, memory, communication, step time and the best
layout of a training run on a cluster.

- :mod:`counts`    exact parameters, FLOPs per token, KV cache (``plan_model``; the trainer's MFU)
- :mod:`per_gpu`   what one GPU holds and computes under TP / EP
- :mod:`layout`    the layout (DP, TP, EP, ZeRO, micro-batch, T, k, checkpointing) and runtime facts
- :mod:`memory`    peak memory per GPU
- :mod:`comms`     collectives per step (DP / ZeRO, TP, EP)
- :mod:`cluster`   GPU presets and the cluster
- :mod:`estimate`  step time, MFU, throughput of one layout
- :mod:`search`    every layout, fastest that fit first, and why the rest fail
- :mod:`plan_cli`  the ``mythos plan`` command
"""

from mythos_scale.plan.counts import plan_model
from mythos_scale.plan.plan_cli import main

__all__ = ["main", "plan_model"]

"""The per-step loop count T.

T is a pure function of (seed, step), so every rank draws the same T without communicating
and a resumed run draws exactly what an uninterrupted one would.  Samplers follow Huginn
(Poisson-lognormal around a mean) and Parcae (Poisson), shifted to start at ``min``; ``fixed``
always returns the mean.
"""

from __future__ import annotations

import math

import numpy as np

from mythos_scale.config import LoopSchedule


def sample_loops(schedule: LoopSchedule, seed: int, step: int) -> int:
    """Loop count for optimizer step ``step``: ``T = min + X`` with ``E[X] = mean - min``, so the
    mean is ``mean`` (before the cut at ``max``).  ``poisson``: X ~ Poisson; ``poisson_lognormal``
    (Huginn): X ~ Poisson(rate), rate ~ LogNormal(sigma = lognormal_sigma), a heavy tail of deep steps."""
    if schedule.sampler == "fixed" or schedule.mean == schedule.min:
        return schedule.mean
    rng = np.random.default_rng([seed, step, 0x100B5])
    extra = schedule.mean - schedule.min
    if schedule.sampler == "poisson":
        x = rng.poisson(extra)
    else:
        sigma = schedule.lognormal_sigma
        x = rng.poisson(rng.lognormal(math.log(extra) - sigma * sigma / 2, sigma))
    return int(min(schedule.min + x, schedule.max))


def step_backprop_depth(schedule: LoopSchedule, n_loops: int) -> int:
    """k: gradients flow through the last k of the n_loops iterations."""
    return min(schedule.backprop_depth, n_loops)

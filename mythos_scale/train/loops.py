"""The per-step loop count T.

T is a pure function of (seed, step), so every rank draws the same T without communicating
and a resumed run draws exactly what an uninterrupted one would.  Samplers follow Huginn
(Poisson-lognormal around a mean) and Parcae (Poisson); ``fixed`` always returns the mean.
"""

from __future__ import annotations

import math

import numpy as np

from mythos_scale.config import LoopSchedule


def sample_loops(schedule: LoopSchedule, seed: int, step: int) -> int:
    """Loop count for optimizer step ``step``, clipped to [schedule.min, schedule.max]."""
    if schedule.sampler == "fixed":
        return schedule.mean
    rng = np.random.default_rng([seed, step, 0x100B5])
    if schedule.sampler == "poisson":
        t = rng.poisson(schedule.mean)
    else:  # poisson_lognormal: rate ~ LogNormal with E[rate] = mean, then T ~ Poisson(rate)
        sigma = schedule.lognormal_sigma
        rate = rng.lognormal(math.log(schedule.mean) - sigma * sigma / 2, sigma)
        t = rng.poisson(rate)
    return int(min(max(t, schedule.min), schedule.max))


def backprop_depth(schedule: LoopSchedule, n_loops: int) -> int:
    """k: gradients flow through the last k of the n_loops iterations."""
    return min(schedule.backprop_depth, n_loops)

"""The per-step loop-count sampler: a pure function of (seed, step), shifted to start at ``min``
with the configured mean, and a heavy tail for ``poisson_lognormal``."""

from __future__ import annotations

import numpy as np

from mythos_scale.config import LoopSchedule
from mythos_scale.train.loops import sample_loops, step_backprop_depth


def _draws(schedule: LoopSchedule, n: int = 4000, seed: int = 0) -> np.ndarray:
    return np.array([sample_loops(schedule, seed, step) for step in range(n)])


def test_same_draw_for_the_same_seed_and_step():
    schedule = LoopSchedule(sampler="poisson_lognormal", mean=4, min=2, max=16)
    assert _draws(schedule, 50).tolist() == _draws(schedule, 50).tolist()
    assert _draws(schedule, 50).tolist() != _draws(schedule, 50, seed=1).tolist()


def test_mean_min_max_and_tail():
    lognormal = _draws(LoopSchedule(sampler="poisson_lognormal", mean=4, min=3, max=64, lognormal_sigma=1.0))
    poisson = _draws(LoopSchedule(sampler="poisson", mean=4, min=3, max=64))
    for draws in (lognormal, poisson):
        assert draws.min() == 3 and abs(draws.mean() - 4) < 0.1
    assert (lognormal >= 8).mean() > 3 * (poisson >= 8).mean() > 0  # the heavy tail: deep steps
    capped = _draws(LoopSchedule(sampler="poisson_lognormal", mean=4, min=3, max=8, lognormal_sigma=1.0))
    assert capped.max() == 8
    assert set(_draws(LoopSchedule(sampler="poisson", mean=3, min=3, max=8), 20)) == {3}
    assert set(_draws(LoopSchedule(sampler="fixed", mean=5, min=1, max=8), 20)) == {5}


def test_backprop_depth_is_capped_by_the_loops():
    schedule = LoopSchedule(backprop_depth=3)
    assert [step_backprop_depth(schedule, t) for t in (1, 3, 9)] == [1, 3, 3]

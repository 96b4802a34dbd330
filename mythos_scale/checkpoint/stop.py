"""The stop budget: what a run asked to stop (a preemption's SIGTERM, Slurm's pre-timeout
signal, Ctrl-C) saves in the grace time it has before SIGKILL.  Pure arithmetic on the figures
of the last committed save: no collective, no file (the checkpointer gathers the inputs)."""

from __future__ import annotations

from dataclasses import dataclass

STOP_MARGIN_S = 2.0  # of the grace time, kept for exiting after the last save


@dataclass
class SaveTimes:
    """One committed save, the slowest rank's figures."""

    step: int
    bytes: int  # all ranks together
    blocked_s: float  # the step loop waited this long (host copy)
    write_s: float  # writing and fsync, in the background when asynchronous
    commit_s: float  # the gather and rank 0's commit record

    @property
    def total_s(self) -> float:
        """What the save would take if made now and waited for."""
        return self.blocked_s + self.write_s + self.commit_s


@dataclass
class StopPlan:
    finish_pending: bool  # commit the save in flight
    discard_pending: bool  # abort it (it cannot finish in time)
    save_now: bool  # then save the current step
    reason: str


def plan_stop(step: int, budget_s: float | None, pending_step: int | None, pending_s: float,
              last: SaveTimes | None) -> StopPlan:
    """What to save when a stop is requested at ``step``.  ``budget_s``: seconds left before
    SIGKILL (None: no deadline); ``pending_step`` / ``pending_s``: the save in flight and the
    seconds it still needs; ``last``: the last committed save (the estimate of a new one).

    Without a deadline: finish the save in flight, then save this step.  With one: finish the
    save in flight if it fits (the cheapest exact resume point: its data is mostly written),
    then save this step if a save, as long as the last one took, fits what is left; a save that
    does not fit is not started (the last committed checkpoint stays the resume point and the
    process exits in time, status 75).  With no save measured yet, one is tried: a save cut
    short by SIGKILL never replaces the previous checkpoint."""
    estimate = last.total_s if last is not None else None
    if budget_s is None:
        return StopPlan(pending_step is not None, False, pending_step != step, "saving")
    left = budget_s
    finish = pending_step is not None and pending_s <= left
    if finish:
        left -= pending_s
    discard = pending_step is not None and not finish
    save_now = pending_step != step and (estimate is None or estimate <= left)
    parts = [f"{budget_s:.1f}s of the grace time left"]
    if finish:
        parts.append(f"finishing the save of step {pending_step} in flight (~{pending_s:.1f}s)")
    elif discard:
        parts.append(f"discarding the save of step {pending_step} in flight (~{pending_s:.1f}s more)")
    if save_now:
        parts.append(f"saving step {step}" + (f" (~{estimate:.1f}s, as the last save took)" if estimate else
                                              " (no earlier save to estimate from)"))
    elif pending_step != step:
        parts.append(f"not saving step {step}: a save takes ~{estimate:.1f}s (the last one)")
    return StopPlan(finish, discard, save_now, "; ".join(parts))

"""Host values read in a checkpointed forward, replayed in its activation-checkpoint recompute.

Some layers must read a value on the host to run (expert parallelism: the split sizes of its
all-to-all, which ``all_to_all_single`` takes as Python ints; the per-expert loop's row counts).
On a GPU each read is a device->host sync.  A checkpointed loop iteration runs twice (forward,
then its recompute in backward) on the same inputs, and the model's forward is deterministic
(moe.py: no scatter-add), so the recompute would read the very same values: it replays the
forward's instead, and skips the reads (and the collective that produced them).

:func:`replayed_in_recompute` wraps the function given to ``torch.utils.checkpoint``: its first
call (the forward) records every :func:`host_values` call in order, later calls (the recompute)
replay them in the same order.  Outside such a function :func:`host_values` just reads.  (A
wrapper rather than checkpoint's ``context_fn``, which tracing (make_fx, torch.compile) accepts
only as dispatch modes: a Python hook on every op.)
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

Value = TypeVar("Value")


class _Memo:
    """The host values of one checkpointed call, in the order its forward read them."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.replay_next: int | None = None  # None while recording

    def read(self, key: str, read: Callable[[], Value]) -> Value:
        if self.replay_next is None:
            value = read()
            self.values.append((key, value))
            return value
        if self.replay_next >= len(self.values) or self.values[self.replay_next][0] != key:
            raise RuntimeError(f"activation-checkpoint recompute asked for host value {key!r} #{self.replay_next}, "
                               f"which its forward did not read at that point: the recompute took another path")
        _, value = self.values[self.replay_next]
        self.replay_next += 1
        return value


class _Phase:
    """Makes ``memo`` the active one while entered, recording or replaying from the start."""

    def __init__(self, memo: _Memo, replay: bool) -> None:
        self.memo, self.replay = memo, replay

    def __enter__(self) -> None:
        self.memo.replay_next = 0 if self.replay else None
        self.token = _active.set(self.memo)

    def __exit__(self, *exc) -> None:
        _active.reset(self.token)


_active: ContextVar[_Memo | None] = ContextVar("mythos_recompute_memo", default=None)


def replayed_in_recompute(fn: Callable[..., Value]) -> Callable[..., Value]:
    """``fn`` for one ``torch.utils.checkpoint`` call: the first call records the host values it
    reads, every later one (a recompute) replays them."""
    memo, recorded = _Memo(), False

    def run(*args, **kwargs):
        nonlocal recorded
        with _Phase(memo, replay=recorded):
            recorded = True
            return fn(*args, **kwargs)

    return run


def host_values(key: str, read: Callable[[], Value]) -> Value:
    """``read()`` (which may sync and run collectives), except in an activation-checkpoint
    recompute, which gets what the forward's ``read()`` returned at the same point.  ``key``
    names the read, to catch a recompute that diverges from its forward."""
    memo = _active.get()
    return read() if memo is None else memo.read(key, read)

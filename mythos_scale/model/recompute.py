"""Host values read in a checkpointed forward, replayed in its activation-checkpoint recompute.

Some layers must read a value on the host to run (expert parallelism: the split sizes of its
all-to-all, which ``all_to_all_single`` takes as Python ints; the per-expert loop's row counts).
On a GPU each read is a device->host sync.  A checkpointed loop iteration runs twice (forward,
then its recompute in backward) on the same inputs, and the model's forward is deterministic
(moe.py: no scatter-add), so the recompute would read the very same values: it replays the
forward's instead, and skips the reads (and the collective that produced them).

:func:`checkpoint_contexts` is the ``context_fn`` of ``torch.utils.checkpoint`` (non-reentrant):
the forward records every :func:`host_values` call in order, the recompute replays them in the
same order.  Outside a checkpoint :func:`host_values` just reads.
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
    """Makes ``memo`` the active one while entered; re-enterable (a second backward recomputes again)."""

    def __init__(self, memo: _Memo, replay: bool) -> None:
        self.memo, self.replay, self.tokens = memo, replay, []

    def __enter__(self) -> None:
        if self.replay:
            self.memo.replay_next = 0  # every recompute replays from the start
        self.tokens.append(_active.set(self.memo))

    def __exit__(self, *exc) -> None:
        _active.reset(self.tokens.pop())


_active: ContextVar[_Memo | None] = ContextVar("mythos_recompute_memo", default=None)


def checkpoint_contexts() -> tuple[Any, Any]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""
    memo = _Memo()
    return _Phase(memo, replay=False), _Phase(memo, replay=True)


def host_values(key: str, read: Callable[[], Value]) -> Value:
    """``read()`` (which may sync and run collectives), except in an activation-checkpoint
    recompute, which gets what the forward's ``read()`` returned at the same point.  ``key``
    names the read, to catch a recompute that diverges from its forward."""
    memo = _active.get()
    return read() if memo is None else memo.read(key, read)

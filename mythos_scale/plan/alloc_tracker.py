"""Peak live tensor bytes of some PyTorch code, measured at the dispatcher (any device, CPU too).

:class:`PeakTracker` is a ``TorchDispatchMode``: every aten op's output storages that it has not
seen (and that are not an input's: views, in-place results) are counted live until the
storage is freed (a ``weakref.finalize`` on the storage), so the
peak is that of the tensors the code allocates through ops, forward and autograd backward alike
(the backward of CPU tensors runs in the calling thread, under the mode).  Storages that existed
before the ``with`` block are not counted, and neither are an op's internal scratch buffers:
it measures what ``torch.cuda.max_memory_allocated`` would show above the starting point, minus
kernel workspaces.  It lets the planner's memory model be checked on a machine without a GPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as tracker: ...`` then ``tracker.peak`` (bytes above the start)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: not a new allocation
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen or key in inputs:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out

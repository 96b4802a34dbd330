"""Counting the points where the host waits for the device, on any machine (CPU included).

On a GPU every one of these stalls the launch queue until the device has caught up, so a
training step should have only the few it cannot avoid (reading the loss for the log, the
expert-parallel split sizes).  A CPU has no queue, so nothing can be timed there; but the
operations that would sync are the same ones, and :class:`HostSyncCounter` counts them as
they are dispatched (forward, backward and optimizer, DeepSpeed's own included):

- ``item()``, ``bool()``, ``int()``, ``float()`` of a tensor (``aten._local_scalar_dense``);
- ``tolist()`` (a device->host copy; torch reads it without dispatching, so it is wrapped);
- ops whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``): the host must learn the size;
- tensors built from host values (``torch.tensor``, ``as_tensor`` of Python numbers:
  ``aten.lift_fresh``): on CUDA a blocking host->device copy, which torch follows with a stream
  synchronize.

What it cannot see on CPU: ``.to(device)`` / ``.cpu()`` of a tensor already on the target (a no-op
there, a copy on a GPU), e.g. the trainer moving each batch to the device.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Data-dependent output shapes: the host reads a size from the device.
_SHAPE_FROM_DATA = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                    aten.unique_dim.default, aten.unique_consecutive.default}


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` and ``syncs.by_kind``
    (a Counter: ``item``, ``tolist``, ``shape_from_data``, ``host_tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self._tolist = None

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.by_kind["item"] += 1
        elif func in _SHAPE_FROM_DATA or (func is aten.repeat_interleave.Tensor
                                          and kwargs.get("output_size") is None):
            self.by_kind["shape_from_data"] += 1
        elif func is aten.lift_fresh.default:
            self.by_kind["host_tensor"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        original, counts = self._tolist, self.by_kind

        def tolist(tensor: torch.Tensor):
            counts["tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

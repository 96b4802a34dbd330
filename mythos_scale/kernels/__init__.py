"""The fused ops the model calls, and the choice of implementation per device.

Each op name has a pure-PyTorch reference (:mod:`mythos_scale.kernels.reference`); the compiled
extension adds fused implementations (:mod:`mythos_scale.kernels.fused`, the ``mythos::`` custom
operators) for the devices it was built for (a CPU-only build has no CUDA kernels).
:func:`select_kernels` returns a :class:`KernelDispatch` for a mode; a model holds its own
(``model.kernels``, from ``cfg.kernels``) and its modules call ``self.kernels.<op>(...)``.  Each
call runs the fused operator when the extension has a kernel for the device of the op's first
tensor argument, else the reference; the choice for each device is made, and logged, on its
first call.  There is no process-wide choice: two models in one process may differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

import torch

from mythos_scale.kernels import reference, varlen  # noqa: F401  (varlen registers mythos::varlen_attention)

log = logging.getLogger(__name__)

MODES = ("auto", "fused", "reference")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}  # devices the extension can have kernels for


def fused_devices() -> tuple[str, ...]:
    """Device types the loaded extension has kernels for (empty when it is not loaded)."""
    return tuple(device for device, key in _DISPATCH_KEYS.items()
                 if torch._C._dispatch_has_kernel_for_dispatch_key("mythos::swiglu", key))


class KernelDispatch:
    """What :func:`ops` returns: per op call, the fused operator where the extension was built
    for the tensors' device, else the reference (``mode=reference``: always the reference;
    ``mode=fused``: an error on a device without fused kernels)."""

    def __init__(self, mode: str, fused: ModuleType | None) -> None:
        self.mode, self.fused = mode, fused
        self._by_device: dict[str, ModuleType] = {}

    def implementation(self, device_type: str) -> ModuleType:
        """The module (fused or reference) that runs ops on ``device_type``."""
        impl = self._by_device.get(device_type)
        if impl is None:
            impl = self._by_device[device_type] = self._choose(device_type)
        return impl

    def _choose(self, device_type: str) -> ModuleType:
        if self.mode == "reference" or self.fused is None:
            log.info("kernels: PyTorch reference ops on %s (mode=%s)", device_type, self.mode)
            return reference
        built = fused_devices()
        if device_type in built:
            log.info("kernels: fused mythos:: operators on %s (mode=%s)", device_type, self.mode)
            return self.fused
        why = (f"the mythos kernel extension has no {device_type} kernels (built for: "
               f"{', '.join(built) or 'nothing'})"
               + ("; rebuild it with MYTHOS_BUILD_EXT=cuda" if device_type == "cuda" else ""))
        if self.mode == "fused":
            raise RuntimeError(f"model.kernels=fused but {why}")
        log.info("kernels: PyTorch reference ops on %s (mode=auto: %s)", device_type, why)
        return reference

    def __getattr__(self, name: str) -> Callable:
        ref = getattr(reference, name)  # AttributeError for names that are not ops

        def op(first: torch.Tensor, *args, **kwargs):
            impl = self.implementation(first.device.type)
            return getattr(impl, name, ref)(first, *args, **kwargs)

        op.__name__, op.__doc__ = name, ref.__doc__
        self.__dict__[name] = op  # later lookups skip __getattr__
        return op

    def __deepcopy__(self, memo: dict) -> KernelDispatch:
        return self  # no state but the choice: a copied model shares its original's dispatch

    def __reduce__(self):
        return select_kernels, (self.mode,)  # pickled (a spawned process, torch.save) as its mode


def select_kernels(mode: str = "auto") -> KernelDispatch:
    """A dispatch for ``mode``: ``reference``, ``fused`` (error if the extension is not built, or
    has no kernels for a device the model runs on) or ``auto`` (fused where built)."""
    if mode not in MODES:
        raise ValueError(f"model.kernels: unknown mode {mode!r} ({'|'.join(MODES)})")
    fused = None
    if mode != "reference":
        try:
            from mythos_scale.kernels import fused
        except ImportError as err:
            if mode == "fused":
                raise RuntimeError(f"model.kernels=fused but {err}") from err
            log.info("kernels: the fused extension is unavailable (%s); PyTorch reference ops", err)
    return KernelDispatch(mode, fused)

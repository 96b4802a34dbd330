"""The fused ops the model calls, and the choice of implementation.

The model calls ``ops().<name>(...)``.  Each name has a pure-PyTorch reference
(:mod:`mythos_scale.kernels.reference`); when the compiled extension is available the
fused implementation (:mod:`mythos_scale.kernels.fused`, the ``mythos::`` custom operators)
is used instead.  The choice is made once per process by :func:`select_kernels` and logged.
"""

from __future__ import annotations

import logging
from types import ModuleType

from mythos_scale.kernels import reference

log = logging.getLogger(__name__)

_selected: ModuleType | None = None


def select_kernels(mode: str = "auto") -> ModuleType:
    """Choose the op implementation: ``reference``, ``fused`` (error if not built) or ``auto``
    (fused when the extension imports, else reference)."""
    global _selected
    if mode not in ("auto", "fused", "reference"):
        raise ValueError(f"model.kernels: unknown mode {mode!r} (auto|fused|reference)")
    if mode == "reference":
        _selected = reference
        log.info("kernels: using the PyTorch reference ops (mode=reference)")
        return _selected
    try:
        from mythos_scale.kernels import fused
    except ImportError as err:
        if mode == "fused":
            raise RuntimeError(f"model.kernels=fused but {err}") from err
        _selected = reference
        log.info("kernels: using the PyTorch reference ops (mode=auto; fused unavailable: %s)", err)
        return _selected
    _selected = fused
    log.info("kernels: using the fused mythos:: operators (mode=%s)", mode)
    return _selected


def ops() -> ModuleType:
    """The selected op implementation (``auto`` on first use)."""
    return _selected if _selected is not None else select_kernels("auto")

"""Stop requests, shared by the launcher, the command and the trainer.

SIGTERM, SIGUSR1 (Slurm's pre-timeout signal) and SIGINT (Ctrl-C) ask for a stop: the run
finishes its step, saves, and exits with ``EXIT_PREEMPTED``.  A second SIGINT means "now":
it raises KeyboardInterrupt, and the run ends without saving (``EXIT_INTERRUPTED``; both in
:mod:`mythos_scale.exit_codes`).
Imports nothing heavy: handlers are installed before torch and DeepSpeed load, so a signal
during start-up is never lost.
"""

from __future__ import annotations

import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_stop_signal: str | None = None
_sigterm_time: float | None = None  # time.monotonic() when the first SIGTERM arrived


def _request_stop(signum: int, _frame) -> None:
    global _stop_signal, _sigterm_time
    if signum == signal.SIGINT and _stop_signal == "SIGINT":
        raise KeyboardInterrupt
    _stop_signal = signal.Signals(signum).name
    if signum == signal.SIGTERM and _sigterm_time is None:
        _sigterm_time = time.monotonic()


def install_stop_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _request_stop)


def stop_requested() -> str | None:
    """The name of the first stop signal received by this process, or None."""
    return _stop_signal


def sigterm_age_s() -> float | None:
    """Seconds since this process got SIGTERM, or None: the grace time before SIGKILL runs from
    there."""
    return None if _sigterm_time is None else time.monotonic() - _sigterm_time

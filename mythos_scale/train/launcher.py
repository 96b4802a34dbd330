"""``mythos train --nproc N``: start N ranks on this machine and stay their one point of control.

Why not the ``deepspeed`` launcher: on one node its top process (``deepspeed/launcher/runner.py``)
installs no signal handler, so a SIGTERM from a user or a scheduler kills it and leaves its child
``launch.py`` and the ranks training as orphans, with nothing saved.  This launcher:

- forwards SIGTERM, SIGUSR1 and SIGINT to every rank, which saves and exits with status 75;
- starts the ranks in their own session, so a terminal's Ctrl-C reaches them once (through here),
  and has the kernel send them SIGTERM if the launcher itself dies (``PR_SET_PDEATHSIG``): they
  save and stop instead of training on unseen;
- when a rank fails, gives the others ``FAILURE_GRACE_S`` to stop on their own, then kills them
  (they would otherwise wait in a collective for the lost peer until its timeout);
- exits with the ranks' status: 0 when all finished, 75 when they stopped on a signal, else the
  first failure's status (2 for bad input, as every rank reports);
- checks MASTER_PORT before starting anything (a busy port is a clear error, status 2) and picks
  a free port when it is not set.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from mythos_scale.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED
from mythos_scale.train.stop_signals import STOP_SIGNALS

FAILURE_GRACE_S = 15.0
_PR_SET_PDEATHSIG = 1


def launch_problem(environ: dict[str, str]) -> str | None:
    """Why ranks cannot be launched from this environment (None when they can)."""
    if environ.get("RANK") or environ.get("SLURM_PROCID"):
        return ("--nproc starts the ranks itself, but this process already is a rank of another "
                "launcher (RANK or SLURM_PROCID is set); drop --nproc")
    port = environ.get("MASTER_PORT")
    if not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"MASTER_PORT={port!r} is not a port number"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore does
        try:
            s.bind(("", int(port)))
        except OSError as exc:
            return (f"MASTER_PORT={port} is in use ({exc.strerror}): another run or program "
                    f"holds it. Choose a free port (MASTER_PORT={int(port) + 1} ...), or leave "
                    f"MASTER_PORT unset and a free one is picked")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM (save and stop) when the launcher dies."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N


def launch_local(nproc: int, rank_args: list[str]) -> int:
    """Run ``python -m mythos_scale.train *rank_args`` as ``nproc`` ranks; return the status.
    Check :func:`launch_problem` first."""
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = int(os.environ.get("MASTER_PORT") or _free_port())
    command = [sys.executable, "-m", "mythos_scale.train", *rank_args]
    procs: list[subprocess.Popen] = []

    def forward(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        print(f"mythos train: {name}: asking the {nproc} ranks to save and stop"
              + (" (Ctrl-C again stops them without saving)" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    print(f"mythos train: {nproc} ranks, master {addr}:{port}: {shlex.join(command)}",
          file=sys.stderr, flush=True)
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=addr, MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command, env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent))

    failure, failed_at = None, 0.0
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if failure is None and code not in (None, EXIT_OK, EXIT_PREEMPTED):
                failure, failed_at = _status(code), time.monotonic()
                print(f"mythos train: rank {rank} failed (status {failure}); stopping the others",
                      file=sys.stderr, flush=True)
        if failure is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    if failure is not None:
        return failure or EXIT_FAILED
    return EXIT_PREEMPTED if any(p.returncode == EXIT_PREEMPTED for p in procs) else EXIT_OK

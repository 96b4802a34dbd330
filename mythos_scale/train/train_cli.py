"""`mythos train` / `python -m mythos_scale.train`: check the config, then train.

    mythos train --config configs/tiny_cpu.yaml train.max_steps=50       one process
    mythos train --nproc 2 --config configs/tiny_cpu.yaml                2 ranks on this machine
    deepspeed --num_gpus 8 --module mythos_scale.train --config ...      under DeepSpeed's launcher
    srun python -m mythos_scale.train --config ...                       under Slurm (see slurm/)

The config is checked before torch or DeepSpeed is imported: --help and config errors answer
in about a second.  Exit status: 0 finished, 2 bad config / data / checkpoint / launch
environment, 75 stopped on SIGTERM, SIGUSR1 or Ctrl-C after saving (requeue the job, or run
the same command again to resume), 130 a second Ctrl-C (no save), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys

from mythos_scale.config import ConfigError, dump_config, layout_problem, load_config
from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK
from mythos_scale.train.stop_signals import install_stop_handlers
from mythos_scale.versions import ALLOW_UNTESTED_ENV, untested_versions


def check_versions() -> None:
    """Refuse (exit 2) dependency versions outside the tested ranges, unless overridden."""
    problems = untested_versions()
    if not problems:
        return
    text = "; ".join(problems)
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        print(f"mythos train: warning: untested versions ({ALLOW_UNTESTED_ENV}=1): {text}", file=sys.stderr)
        return
    raise ConfigError(f"{text}. Install the tested versions (pip install -e . pins them) or set "
                      f"{ALLOW_UNTESTED_ENV}=1 to run anyway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mythos train", description="Pretrain a Recurrent-Depth "
                                     "Transformer with DeepSpeed: in this process, on --nproc local "
                                     "ranks, or as one rank under a launcher.",
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (defaults when omitted)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks to start on this machine (default 1: this process)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # DeepSpeed launcher
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides + defaults) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    install_stop_handlers()  # from the start: a signal during start-up stops the run at step 1
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return EXIT_OK
        check_versions()
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        launched = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
        if not launched:  # the world is known here: refuse a layout that cannot fit it before starting
            problem = layout_problem(args.nproc, cfg.parallel.tp, cfg.parallel.ep)
            if problem:
                raise ConfigError(f"{problem} (--nproc {args.nproc})")
        if args.nproc > 1:
            from mythos_scale.train.launcher import launch_local, launch_problem

            problem = launch_problem(dict(os.environ))
            if problem:
                print(f"mythos train: error: {problem}", file=sys.stderr)
                return EXIT_BAD_INPUT
            rank_args = (["--config", args.config] if args.config else []) + args.overrides
            return launch_local(args.nproc, rank_args)
        from mythos_scale.train.trainer import run  # torch and DeepSpeed load here

        return run(cfg)
    except ConfigError as exc:
        print(f"mythos train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mythos train: interrupted again: stopped without saving", file=sys.stderr)
        return EXIT_INTERRUPTED

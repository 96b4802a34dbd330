"""The ``mythos`` command.  Each subcommand lives in its own module with ``main(argv) -> int``;
modules are imported only when their subcommand runs, so ``mythos --help`` stays fast."""

from __future__ import annotations

import importlib
import sys

from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("mythos_scale.plan", "size a run: parameters, FLOPs, memory, communication, step time, best layout"),
    "data": ("mythos_scale.data.data_cli", "train a tokenizer, prepare MDS shards, the embedded corpus"),
    "train": ("mythos_scale.train.train_cli", "pretrain with DeepSpeed (alone or under a launcher)"),
    "plot": ("mythos_scale.train.plots", "PNG plots of a run: loss, loss vs loop count, expert load"),
    "eval": ("mythos_scale.eval.eval_cli", "held-out loss, perplexity, bits per byte at several loop counts (and early exit)"),
    "generate": ("mythos_scale.eval.generate_cli", "sample text with the compressed KV cache, tokens/s, loops used"),
    "ckpt": ("mythos_scale.eval.ckpt_cli", "inspect a checkpoint, or export it as one model.safetensors"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    rows = "\n".join(f"  {n:<{width}}  {h}" for n, (_, h) in SUBCOMMANDS.items())
    return f"usage: mythos <command> [args]\n\ncommands:\n{rows}\n\n'mythos <command> --help' for details."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return EXIT_OK if argv else EXIT_BAD_INPUT
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mythos: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

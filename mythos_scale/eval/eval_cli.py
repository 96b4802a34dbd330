"""`mythos eval`: held-out loss, perplexity and bits per byte at several loop counts.

    mythos eval --run runs/tiny_cpu                               the run's newest checkpoint
    mythos eval --checkpoint exported/ --loops 1,4,16 --json      an export (or one checkpoint)
    mythos eval --run runs/tiny_cpu --data data/mine              another prepared dataset's val split
    mythos eval --checkpoint exported/ --tasks my_task.yaml,hellaswag --loops 1,4,8   lm-evaluation-harness
    mythos eval --run runs/probe --by-difficulty --loops 1,2,4,8     a `mythos data synthetic` task

At each loop count: all loops; ACT halting (ACT models); the per-token KL early exit at each
--exit-thresholds value (nats; reports the mean loops used).  Bits per byte = summed token
losses / ln 2 / UTF-8 bytes of the predicted tokens, comparable across tokenizers.  Writes a
PNG of loss against loops (--plot; default <run>/plots/eval_loops.png for --run, else
./eval_loops.png).  --tasks runs lm-evaluation-harness tasks (names, or local task YAML files) at
each loop count instead (the `eval` extra; see mythos_scale/eval/harness.py).  --by-difficulty,
for a model trained on a `mythos data synthetic` dataset: exact-match accuracy of the answers by
difficulty and loop count, and with each KL exit threshold at the largest loop count the loops
the answers used (see mythos_scale/eval/reasoning.py).
Exit status 2 for a path, dataset, task or option that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what}: expected integers >= 1, got {text!r}")
    return values


def parse_floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be >= 0, got {text!r}")
    return values


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--run / --checkpoint / --device, shared by eval and generate."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a run folder (its newest usable checkpoint)")
    where.add_argument("--checkpoint", help="an exported folder (mythos ckpt export) or one checkpoint folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default 0: torch's choice). On a busy CPU, 1 can be much faster")


def resolve_device(name: str, threads: int = 0):
    """The torch device ``--device`` names; sets torch's CPU threads when ``--threads`` is given."""
    import torch

    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here")
    return device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mythos eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--loops", type=lambda s: parse_ints(s, "--loops"), default=[1, 2, 4, 8, 16, 32],
                        help="loop counts, comma-separated (default 1,2,4,8,16,32)")
    parser.add_argument("--exit-thresholds", type=parse_floats, default=[5e-4],
                        help="KL early-exit thresholds in nats, comma-separated ('' for none; default 5e-4)")
    parser.add_argument("--data", help="a prepared dataset folder (or 'embedded'): its val split "
                        "(default: the run's validation data)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="evaluate the first N batches (0: all)")
    parser.add_argument("--json", action="store_true", help="print JSON (every row) instead of the table")
    parser.add_argument("--plot", help="PNG of loss against loops")
    parser.add_argument("--tasks", help="lm-eval tasks, comma-separated: names or local task YAML files")
    parser.add_argument("--by-difficulty", action="store_true",
                        help="synthetic reasoning data: exact-match accuracy by difficulty x loops")
    parser.add_argument("--limit", type=int, default=0, help="--tasks: the first N documents of each task (0: all)")
    return parser


def val_batches(loaded, data: str | None, batch_size: int, max_batches: int):
    """The validation batches and the byte length of each token id (None for a tokenizer that is
    not byte-level BPE).  DataError for a dataset the model cannot read."""
    from mythos_scale.data.loader import build_val_loader
    from mythos_scale.data.manifest import TOKENIZER_NAME, DataError, read_manifest
    from mythos_scale.data.sources import resolve_dataset
    from mythos_scale.data.tokenizer import load_tokenizer
    from mythos_scale.eval.text_bytes import token_byte_lengths

    cfg = loaded.cfg
    source = data or cfg.data.val_path or cfg.data.sources[0].path
    root = resolve_dataset(source, cfg.data.cache_dir, cfg.data.seq_len, cfg.model.vocab_size)
    manifest = read_manifest(root)
    if manifest.seq_len > cfg.model.max_seq_len:
        raise DataError(f"{source}: sequences of {manifest.seq_len} tokens exceed the model's max_seq_len "
                        f"({cfg.model.max_seq_len})")
    if loaded.tokenizer is not None and manifest.tokenizer_sha256 != loaded.tokenizer.sha256:
        raise DataError(f"{source} was tokenized with another tokenizer than the model's "
                        f"({loaded.tokenizer.path}): its token ids mean other text")
    data_cfg = cfg.data.model_copy(update={"val_path": source, "seq_len": manifest.seq_len})
    loader = build_val_loader(data_cfg, micro_batch_size=batch_size, dp_rank=0, dp_world=1,
                              vocab_size=cfg.model.vocab_size)
    batches = []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batches.append(batch)
    try:
        byte_lengths = token_byte_lengths(load_tokenizer(root / TOKENIZER_NAME).tokenizer, cfg.model.vocab_size)
    except ValueError as exc:
        print(f"mythos eval: no bits per byte: {exc}", file=sys.stderr)
        byte_lengths = None
    return batches, byte_lengths, source, manifest.eos_id


def _by_difficulty(args: argparse.Namespace, loaded) -> int:
    """``--by-difficulty``: the accuracy table (or JSON) of a synthetic task's val split."""
    from mythos_scale.data.manifest import DataError, read_manifest
    from mythos_scale.data.sources import resolve_dataset
    from mythos_scale.eval.reasoning import accuracy_table, difficulty_batches, format_accuracy

    cfg = loaded.cfg
    source = args.data or cfg.data.val_path or cfg.data.sources[0].path
    manifest = read_manifest(resolve_dataset(source, cfg.data.cache_dir, cfg.data.seq_len, cfg.model.vocab_size))
    if loaded.tokenizer is not None and manifest.tokenizer_sha256 != loaded.tokenizer.sha256:
        raise DataError(f"{source} was tokenized with another tokenizer than the model's ({loaded.tokenizer.path})")
    data = cfg.data.model_copy(update={"seq_len": manifest.seq_len})
    batches = difficulty_batches(source, data, cfg.model.vocab_size, args.batch_size)
    thresholds = [] if loaded.model.halting is not None else args.exit_thresholds
    rows = accuracy_table(batches, loaded.model, args.loops, thresholds)
    if args.json:
        print(json.dumps({"model": loaded.source, "data": source, "rows": rows}, indent=2))
    else:
        print(f"{args.run or args.checkpoint} on {source} (val: {manifest.inputs['val_difficulties']} items "
              f"per difficulty; trained on 1..{manifest.inputs['max_difficulty']})\n{format_accuracy(rows)}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mythos_scale.data.manifest import DataError
    from mythos_scale.eval.evaluate import eval_modes, evaluate_loops, format_table, plot_loss_vs_loops
    from mythos_scale.eval.load import ModelLoadError, load_model

    try:
        if args.batch_size < 1 or args.max_batches < 0:
            raise ValueError("--batch-size must be >= 1 and --max-batches >= 0")
        loaded = load_model(args.run or args.checkpoint, resolve_device(args.device, args.threads))
        if args.tasks:
            from mythos_scale.eval.harness import harness_command

            return harness_command(args, loaded)
        if args.by_difficulty:
            return _by_difficulty(args, loaded)
        batches, byte_lengths, source, eos_id = val_batches(loaded, args.data, args.batch_size, args.max_batches)
    except (ModelLoadError, DataError, ValueError) as exc:
        print(f"mythos eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    modes = eval_modes(loaded.model, args.exit_thresholds)
    rows = evaluate_loops(loaded.model, batches, args.loops, modes, byte_lengths, eos_id=eos_id)
    step = loaded.source.get("step")
    title = f"{args.run or args.checkpoint}" + (f", step {step}" if step is not None else "") + \
        f"; {rows[0]['tokens']} tokens of {source}"
    plot = Path(args.plot) if args.plot else (Path(args.run) / "plots" / "eval_loops.png" if args.run
                                              else Path("eval_loops.png"))
    plot_loss_vs_loops(rows, plot, title)
    if args.json:
        print(json.dumps({"model": loaded.source, "data": source, "tokens": rows[0]["tokens"], "loops": args.loops,
                          "modes": [m.name for m in modes], "rows": rows, "plot": str(plot)}, indent=2))
    else:
        print(f"{title}\n{format_table(rows)}\nplot: {plot}")
    return EXIT_OK

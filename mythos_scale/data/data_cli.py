"""``mythos data tokenizer | prepare | embedded | synthetic``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from mythos_scale.config import DataConfig, ModelConfig
from mythos_scale.data.manifest import DataError
from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK

INPUT_HELP = "files, folders or globs: text, .jsonl(.gz/.zst), .parquet, datasets save_to_disk folders"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mythos data",
        description="train a tokenizer, prepare MDS shards, build the embedded corpus")
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer offline")
    tok.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--out", required=True, help="tokenizer.json to write")
    tok.add_argument("--text-field", default="text", help="JSON-lines field / parquet or datasets column")

    prep = sub.add_parser("prepare", help="tokenize and pack text into MDS shards")
    prep.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    prep.add_argument("--tokenizer", required=True,
                      help="a local tokenizer.json or a folder holding one (never downloaded)")
    prep.add_argument("--seq-len", type=int, required=True)
    prep.add_argument("--out", required=True, help="dataset folder, or an object-store URL")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    prep.add_argument("--text-field", default="text", help="JSON-lines field / parquet or datasets column")
    prep.add_argument("--eos-token", default=None, help="end-of-document token if not standard")
    prep.add_argument("--shard-size", default="32mb", help="shard size limit, e.g. 32mb")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing dataset")

    data, model = DataConfig(), ModelConfig()
    emb = sub.add_parser("embedded", help="build (or find) the embedded stdlib corpus",
                         description="Build the embedded corpus (this Python's standard library "
                         "sources) into the cache that `data.sources: [{path: embedded}]` reads, "
                         "and with --out, copy it to a dataset folder of its own.")
    emb.add_argument("--out", help="dataset folder to write (use it as data.sources='[{path: OUT}]')")
    emb.add_argument("--overwrite", action="store_true",
                     help="replace --out if it is a dataset prepared by this tool")
    emb.add_argument("--cache-dir", default=data.cache_dir,
                     help="cache folder, as data.cache_dir (default %(default)s)")
    emb.add_argument("--seq-len", type=int, default=data.seq_len, help="as data.seq_len")
    emb.add_argument("--vocab-size", type=int, default=model.vocab_size,
                     help="as model.vocab_size")
    emb.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    syn = sub.add_parser("synthetic", help="generate a synthetic reasoning dataset (p-hop, arithmetic chains)",
                         description="Write a seeded synthetic reasoning task as a dataset folder: train "
                         "items of difficulty 1..--max-difficulty, val items of each difficulty "
                         "1..--eval-max-difficulty, the answer marked so that the loss counts it alone. "
                         "`mythos eval --by-difficulty` measures a model trained on it.")
    syn.add_argument("--task", required=True, choices=["p_hop", "arith"],
                     help="p_hop: p-hop induction (difficulty = p); arith: modular arithmetic chains "
                     "(difficulty = steps)")
    syn.add_argument("--out", required=True, help="dataset folder to write")
    syn.add_argument("--n-train", type=int, default=20000, help="train items, equal shares per difficulty")
    syn.add_argument("--n-val", type=int, default=200, help="val items per difficulty")
    syn.add_argument("--max-difficulty", type=int, default=3, help="D: deepest difficulty trained on")
    syn.add_argument("--eval-max-difficulty", type=int, default=None, help="deepest held-out difficulty (default 2D)")
    syn.add_argument("--seq-len", type=int, default=None, help="default: the longest item, rounded up to 8")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--overwrite", action="store_true", help="replace a dataset this tool wrote")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tokenizer":
            from mythos_scale.data.documents import ReadStats, find_input_files, read_documents
            from mythos_scale.data.tokenizer import load_tokenizer, train_bpe

            stats = ReadStats()
            files = find_input_files(args.input)
            try:
                path = train_bpe(read_documents(files, args.text_field, stats), args.vocab_size,
                                 args.out)
            except DataError as exc:
                raise DataError(f"{exc}: {stats.files} file(s) read, {len(stats.skipped)} "
                                f"skipped as binary or non-UTF-8") from None
            print(f"{path}: vocab {load_tokenizer(path).vocab_size} from {stats.documents} "
                  f"documents in {stats.files} files ({len(stats.skipped)} skipped)")
        elif args.command == "prepare":
            from mythos_scale.data.prepare import prepare_dataset

            m = prepare_dataset(args.input, args.tokenizer, args.seq_len, args.out,
                                val_fraction=args.val_fraction, workers=args.workers,
                                text_field=args.text_field, eos_token=args.eos_token,
                                shard_size=args.shard_size, overwrite=args.overwrite)
            for split, s in m.splits.items():
                print(f"{args.out}/{split}: {s.sequences} sequences of {m.seq_len}+1 tokens from "
                      f"{s.documents} documents ({s.tokens} tokens)")
        elif args.command == "synthetic":
            from mythos_scale.data.synthetic import write_synthetic_dataset

            m = write_synthetic_dataset(args.task, args.out, n_train=args.n_train, n_val=args.n_val,
                                        max_difficulty=args.max_difficulty,
                                        eval_max_difficulty=args.eval_max_difficulty, seq_len=args.seq_len,
                                        seed=args.seed, overwrite=args.overwrite)
            print(f"{args.out}: {m.splits['train'].sequences} train items (difficulty 1.."
                  f"{m.inputs['max_difficulty']}), {m.splits['val'].sequences} val items (difficulty 1.."
                  f"{m.inputs['eval_max_difficulty']}), seq_len {m.seq_len}, vocab {m.vocab_size}")
            override = shlex.quote(f"data.sources=[{{path: {json.dumps(args.out)}}}]")
            print(f"train on it with: {override} data.seq_len={m.seq_len} model.max_seq_len={m.seq_len} "
                  f"model.vocab_size={m.vocab_size}; then mythos eval --run RUN --by-difficulty")
        else:
            from mythos_scale.data.embedded import copy_dataset, ensure_embedded_dataset
            from mythos_scale.data.manifest import read_manifest

            path = ensure_embedded_dataset(args.cache_dir, args.seq_len, args.vocab_size,
                                           workers=args.workers)
            if args.out:
                path = copy_dataset(path, Path(args.out).expanduser(), args.overwrite)
            m = read_manifest(path)
            print(f"{path}: " + ", ".join(f"{k} {s.sequences} sequences ({s.tokens} tokens)"
                                          for k, s in m.splits.items()))
            source = args.out or "embedded"
            override = shlex.quote(f"data.sources=[{{path: {json.dumps(source)}}}]")
            print(f"train on it with: {override} data.seq_len={m.seq_len} "
                  f"(model.vocab_size >= {m.vocab_size})")
    except DataError as exc:
        print(f"mythos data {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

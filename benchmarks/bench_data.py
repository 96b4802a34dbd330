"""Data pipeline throughput: ``prepare`` (tokenize + pack + write MDS) on the embedded corpus with
1 and 2 tokenizer workers, and the training loader reading local shards (tokens/s, one process).

    python benchmarks/bench_data.py [--seq-len 256] [--vocab-size 4096] [--json out.json]

``--workers 1`` tokenizes in the main process, where the tokenizers library may use a thread per
core; it is measured both so and pinned to one thread.  ``--workers N > 1`` runs N
single-threaded tokenizer processes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from mythos_scale.config import DataConfig, DataSource
from mythos_scale.data.documents import ReadStats, read_documents
from mythos_scale.data.embedded import stdlib_source_files
from mythos_scale.data.loader import build_train_loader
from mythos_scale.data.prepare import prepare_dataset
from mythos_scale.data.tokenizer import train_bpe


def bench_prepare(files: list[str], tokenizer: Path, seq_len: int, out: Path, workers: int,
                  threaded: bool) -> dict:
    """``threaded=False`` pins the in-process tokenizer to one thread (TOKENIZERS_PARALLELISM)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threaded else "false"
    try:
        start = time.perf_counter()
        m = prepare_dataset(files, tokenizer, seq_len, out, val_fraction=0.02, workers=workers,
                            overwrite=True, progress=False)
        seconds = time.perf_counter() - start
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM")
        if saved is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    tokens = sum(s.tokens for s in m.splits.values())
    return {"workers": workers, "threaded": threaded, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def bench_loader(dataset: Path, seq_len: int, vocab_size: int, batch: int, num_workers: int,
                 steps: int) -> dict:
    cfg = DataConfig(sources=[DataSource(path=str(dataset))], seq_len=seq_len,
                     num_workers=num_workers)
    loader = build_train_loader(cfg, micro_batch_size=batch, dp_rank=0, dp_world=1,
                                vocab_size=vocab_size)
    for _ in range(5):  # warm up (and start workers)
        next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    seconds = time.perf_counter() - start
    loader.close()
    tokens = steps * batch * seq_len
    return {"micro_batch_size": batch, "num_workers": num_workers, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="loader micro-batch size")
    parser.add_argument("--steps", type=int, default=400, help="loader batches timed")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    files = [str(f) for f in stdlib_source_files()]
    corpus_bytes = sum(Path(f).stat().st_size for f in files)
    results: dict = {"corpus_files": len(files), "corpus_bytes": corpus_bytes,
                     "seq_len": args.seq_len, "prepare": [], "loader": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.json"
        start = time.perf_counter()
        train_bpe(read_documents([Path(f) for f in files], "text", ReadStats()),
                  args.vocab_size, tokenizer)
        results["tokenizer_train_s"] = time.perf_counter() - start
        print(f"corpus: {len(files)} files, {corpus_bytes / 1e6:.1f} MB; BPE {args.vocab_size} "
              f"trained in {results['tokenizer_train_s']:.1f} s")
        dataset = Path(tmp) / "ds"
        for workers, threaded in ((1, False), (1, True), (2, False)):
            r = bench_prepare(files, tokenizer, args.seq_len, dataset, workers, threaded)
            results["prepare"].append(r)
            how = "tokenizer threads" if threaded else "single-threaded"
            print(f"prepare  workers={workers} ({how}): {r['tokens'] / 1e6:.2f} M tokens in "
                  f"{r['seconds']:.1f} s = {r['tokens_per_s'] / 1e6:.2f} M tokens/s")
        for num_workers in (0, 2):
            r = bench_loader(dataset, args.seq_len, args.vocab_size, args.batch, num_workers,
                             args.steps)
            results["loader"].append(r)
            print(f"loader   B={args.batch} L={args.seq_len} num_workers={num_workers}: "
                  f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s per process")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Data pipeline: prepare round trip, rank sharding, exact resume, blending, and bad inputs."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from streaming import StreamingDataset
from tokenizers import Tokenizer

from mythos_scale.config import DataConfig, DataSource
from mythos_scale.data.data_cli import main as data_main
from mythos_scale.data.documents import ReadStats, find_input_files, read_documents
from mythos_scale.data.loader import build_train_loader, build_val_loader
from mythos_scale.data.manifest import DataError, check_compatible, read_manifest
from mythos_scale.data.order import BLEND_BLOCK, permute
from mythos_scale.data.prepare import prepare_dataset
from mythos_scale.data.tokenizer import train_bpe

SEQ_LEN = 16
WORDS = ["alpha", "beta", "gamma", "delta", "naïve", "café", "数据", "🙂", "loop", "core",
         "prelude", "coda", "x = 1", "def f():", "\n", "\t", "  "]


def _documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def _write_corpus(folder: Path, docs: list[str]) -> list[str]:
    """Spread ``docs`` over txt, jsonl and parquet files; return them in input (sorted) order."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b, c = docs[:10], docs[10:25], docs[25:]
    for i, doc in enumerate(a):
        (folder / f"a{i:02d}.txt").write_text(doc, encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                            for i, d in enumerate(b)), encoding="utf-8")
    pq.write_table(pa.table({"text": c}), folder / "c.parquet")
    return a + b + c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    docs = _write_corpus(root / "corpus", _documents(40, seed=0))
    tokenizer = train_bpe(docs, 320, root / "tokenizer.json")
    dataset = root / "ds"
    prepare_dataset([str(root / "corpus")], tokenizer, SEQ_LEN, dataset, val_fraction=0.25,
                    progress=False)
    return {"root": root, "docs": docs, "tokenizer": tokenizer, "dataset": dataset}


def _cfg(*paths: str | Path, weights: list[float] | None = None, **kw) -> DataConfig:
    weights = weights or [1.0] * len(paths)
    return DataConfig(sources=[DataSource(path=str(p), weight=w) for p, w in zip(paths, weights)],
                      seq_len=kw.pop("seq_len", SEQ_LEN), **kw)


def _stream_of(split_dir: Path) -> list[int]:
    """The token stream of a split, rebuilt from its sequences (which share boundary tokens)."""
    ds = StreamingDataset(local=str(split_dir), batch_size=1)
    seqs = [ds.get_item(i)["tokens"].tolist() for i in range(ds.num_samples)]
    return seqs[0] + [t for s in seqs[1:] for t in s[1:]]


# --------------------------------------------------------------------------- prepare


def test_prepare_round_trip_in_order(corpus, tmp_path):
    """With no val split, the shards decode back to the input documents, in input order."""
    docs, tok_path = corpus["docs"], corpus["tokenizer"]
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")
    out = tmp_path / "rt"
    m = prepare_dataset([str(corpus["root"] / "corpus")], tok_path, SEQ_LEN, out,
                        val_fraction=0, workers=2, progress=False)
    stream = _stream_of(out / "train")
    expected = [t for d in docs for t in tok.encode(d).ids + [eos]]
    assert stream == expected[:len(stream)]
    assert len(expected) - len(stream) == m.splits["train"].dropped_tail_tokens
    assert m.splits["train"].tokens == len(expected)
    assert m.splits["train"].documents == len(docs) and "val" not in m.splits
    # the text itself survives: every complete document decodes to its input
    bounds = [i for i, t in enumerate(stream) if t == eos]
    starts = [0] + [b + 1 for b in bounds[:-1]]
    decoded = [tok.decode(stream[s:e]) for s, e in zip(starts, bounds)]
    assert decoded == docs[:len(decoded)] and len(decoded) >= len(docs) - 2
    # one worker process or two: the same shards
    one = tmp_path / "one"
    prepare_dataset([str(corpus["root"] / "corpus")], tok_path, SEQ_LEN, one, val_fraction=0,
                    workers=1, progress=False)
    assert (one / "train" / "shard.00000.mds").read_bytes() == \
        (out / "train" / "shard.00000.mds").read_bytes()


def test_val_split_is_every_kth_document(corpus):
    m = read_manifest(corpus["dataset"])
    assert m.splits["val"].documents == 10 and m.splits["train"].documents == 30
    assert m.seq_len == SEQ_LEN and m.inputs["files"] == 12 and m.inputs["skipped_files"] == 0
    tok = Tokenizer.from_file(str(corpus["tokenizer"]))
    val_docs = corpus["docs"][3::4]
    stream = _stream_of(corpus["dataset"] / "val")
    eos = tok.token_to_id("<|endoftext|>")
    expected = [t for d in val_docs for t in tok.encode(d).ids + [eos]]
    assert stream == expected[:len(stream)]


def test_binary_and_non_utf8_files_are_skipped_and_counted(corpus, tmp_path, capsys):
    src = tmp_path / "mixed"
    _write_corpus(src, _documents(30, seed=1))
    (src / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    (src / "blob.bin").write_bytes(bytes(range(256)))
    m = prepare_dataset([str(src)], corpus["tokenizer"], SEQ_LEN, tmp_path / "out",
                        val_fraction=0, progress=False)
    assert m.inputs["skipped_files"] == 2 and m.inputs["documents"] == 30
    out = capsys.readouterr().out
    assert "skipped 2 binary or non-UTF-8 file(s)" in out
    assert "latin1.txt: not UTF-8" in out and "blob.bin: binary" in out


def test_globs_and_jsonl_field(corpus, tmp_path):
    files = find_input_files([str(corpus["root"] / "corpus" / "a0*.txt"),
                              str(corpus["root"] / "corpus" / "b.jsonl")])
    assert [f.name for f in files] == [f"a{i:02d}.txt" for i in range(10)] + ["b.jsonl"]
    with pytest.raises(DataError, match=r"b\.jsonl:1: no field 'body'.*--text-field"):
        list(read_documents(files, "body", ReadStats()))


def test_compressed_jsonl_parquet_and_hf_datasets_folders_read_as_streams(tmp_path):
    """Every format yields the same documents in order; a ``datasets`` save_to_disk folder (a
    DatasetDict of two splits, nested in a dump folder) stands for its Arrow files, and its JSON
    metadata is never read as text."""
    import datasets
    import zstandard

    docs = _documents(40, seed=3)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[:10]).encode()
    dump = tmp_path / "dump"
    dump.mkdir()
    with gzip.open(dump / "a.jsonl.gz", "wb") as f:
        f.write(lines)
    (dump / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[10:20]).encode()))
    pq.write_table(pa.table({"text": docs[20:25]}), dump / "c.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[25:35]}),
                          "test": datasets.Dataset.from_dict({"text": docs[35:]})}).save_to_disk(dump / "d_hf")
    files = find_input_files([str(dump)])
    assert [f.suffix for f in files] == [".gz", ".zst", ".parquet", ".arrow", ".arrow"]
    stats = ReadStats()
    assert list(read_documents(files, "text", stats)) == docs  # train then test, as dataset_dict.json lists them
    assert stats.documents == 40 and not stats.skipped


@pytest.mark.parametrize("name, content, message", [
    ("t.jsonl.gz", b"not gzip at all", r"t\.jsonl\.gz: cannot be read as \.jsonl\.gz"),
    ("t.jsonl.zst", b"not zstd", r"t\.jsonl\.zst: cannot be read as \.jsonl\.zst"),
    ("t.jsonl.gz", gzip.compress(b'{"text": "a"}\n{"txt": "b"}\n'), r"t\.jsonl\.gz:2: no field 'text'"),
])
def test_bad_compressed_jsonl_is_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_documents([tmp_path / name], "text", ReadStats()))


def test_a_non_utf8_line_skips_the_rest_of_a_jsonl_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "first"}\n{"text": "caf\xe9"}\n{"text": "third"}\n')
    stats = ReadStats()
    assert list(read_documents([path], "text", stats)) == ["first"]
    assert stats.skipped == [f"{path}: not UTF-8 (invalid continuation byte at line 2); the rest of the file is skipped"]


@pytest.mark.parametrize("case, message", [
    ("no_input_files", r"no input files"),
    ("empty_file", r"inputs hold no text: 1 file\(s\) read, 0 skipped"),
    ("only_binary", r"inputs hold no text: 1 file\(s\) read, 1 skipped .*binary"),
    ("missing_input", r"input not found: .*nope"),
    ("glob_no_match", r"input pattern .*\*\.zzz' matched no files"),
    ("bad_json_line", r"bad\.jsonl:2: not valid JSON"),
    ("parquet_column", r"t\.parquet: no column 'text' \(has \['body'\]\)"),
    ("missing_tokenizer", r"tokenizer not found: .*missing\.json"),
    ("tokenizer_folder", r"tokenizer folder .* has no tokenizer\.json"),
    ("corrupt_tokenizer", r"not a valid tokenizer file"),
    ("no_eos", r"no end-of-document token"),
    ("val_too_small", r"the val split got \d+ tokens, fewer than one sequence"),
    ("seq_len", r"--seq-len must be >= 1"),
])
def test_prepare_errors_leave_nothing(corpus, tmp_path, case, message):
    src, tok, seq_len, val = tmp_path / "src", corpus["tokenizer"], SEQ_LEN, 0.0
    src.mkdir()
    inputs = [str(src)]
    if case == "empty_file":
        (src / "e.txt").write_text("")
    elif case == "only_binary":
        (src / "x.bin").write_bytes(b"\0\1\2")
    elif case == "missing_input":
        inputs = [str(src / "nope")]
    elif case == "glob_no_match":
        inputs = [str(src / "*.zzz")]
    elif case == "bad_json_line":
        (src / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    elif case == "parquet_column":
        pq.write_table(pa.table({"body": ["x"]}), src / "t.parquet")
    elif case != "no_input_files":
        _write_corpus(src, _documents(30, seed=2))
    if case == "missing_tokenizer":
        tok = tmp_path / "missing.json"
    elif case == "tokenizer_folder":
        tok = tmp_path
    elif case == "corrupt_tokenizer":
        tok = tmp_path / "bad.json"
        tok.write_text('{"model": 1}')
    elif case == "no_eos":
        tok = train_bpe(["no special tokens here"], 260, tmp_path / "t.json")
        raw = json.loads(tok.read_text())
        raw["added_tokens"] = []
        raw["model"]["vocab"].pop("<|endoftext|>")
        tok.write_text(json.dumps(raw))
    elif case == "val_too_small":
        seq_len, val = 1000, 0.05
    elif case == "seq_len":
        seq_len = 0
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare_dataset(inputs, tok, seq_len, out, val_fraction=val, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_existing_output_needs_overwrite(corpus, tmp_path):
    out = tmp_path / "out"
    args = ([str(corpus["root"] / "corpus")], corpus["tokenizer"], SEQ_LEN, out)
    prepare_dataset(*args, val_fraction=0, progress=False)
    with pytest.raises(DataError, match=r"already exists .* --overwrite"):
        prepare_dataset(*args, val_fraction=0, progress=False)
    m = prepare_dataset(*args, val_fraction=0.25, overwrite=True, progress=False)
    assert read_manifest(out).splits["val"].sequences == m.splits["val"].sequences > 0


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, message", [
    ("user_folder", r"replaces only a dataset prepared by this tool.*it has no manifest\.json"),
    ("dataset_plus_user_file", r"replaces only a dataset prepared by this tool.*mine\.txt is not"),
    ("input_itself", r"is or contains the input"),
    ("parent_of_input", r"is or contains the input"),
    ("inside_input", r"is inside .*which holds inputs"),
    ("file_input_next_to_out", r"is inside .*which holds inputs"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_not_our_dataset_is_never_replaced(corpus, tmp_path, case, message,
                                                          overwrite):
    """--overwrite replaces only a dataset this tool wrote; inputs are never an output."""
    src = tmp_path / "corpus"
    _write_corpus(src, _documents(30, seed=3))
    inputs, out = [str(src)], tmp_path / "out"
    if case == "user_folder":
        out.mkdir()
        (out / "notes.txt").write_text("my own notes")
    elif case == "dataset_plus_user_file":
        prepare_dataset(inputs, corpus["tokenizer"], SEQ_LEN, out, val_fraction=0, progress=False)
        (out / "train" / "mine.txt").write_text("do not delete")
    elif case == "input_itself":
        out = src
    elif case == "parent_of_input":
        out = tmp_path
    elif case == "inside_input":
        out = src / "shards"
    elif case == "file_input_next_to_out":
        inputs, out = [str(src / "a00.txt")], src / "shards"
    before = _snapshot(tmp_path)
    if not overwrite and case.startswith(("user_folder", "dataset")):
        message = r"already exists and is not empty; pass --overwrite"
    with pytest.raises(DataError, match=message):
        prepare_dataset(inputs, corpus["tokenizer"], SEQ_LEN, out, val_fraction=0,
                        overwrite=overwrite, progress=False)
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing added


def test_cli(corpus, tmp_path, capsys):
    tok = tmp_path / "tok.json"
    assert data_main(["tokenizer", "--input", str(corpus["root"] / "corpus"), "--vocab-size",
                      "300", "--out", str(tok)]) == 0
    assert data_main(["prepare", "--input", str(corpus["root"] / "corpus"), "--tokenizer",
                      str(tok), "--seq-len", "8", "--out", str(tmp_path / "ds"),
                      "--val-fraction", "0.1", "--workers", "2"]) == 0
    assert read_manifest(tmp_path / "ds").seq_len == 8
    assert data_main(["prepare", "--input", str(tmp_path / "void"), "--tokenizer", str(tok),
                      "--seq-len", "8", "--out", str(tmp_path / "x")]) == 2
    assert "mythos data prepare: error: input not found" in capsys.readouterr().err
    # bad input exits 2 like every other command, and --overwrite never deletes the input
    corpus_dir = str(corpus["root"] / "corpus")
    assert data_main(["prepare", "--input", corpus_dir, "--tokenizer", str(tok), "--seq-len", "8",
                      "--out", corpus_dir, "--overwrite"]) == 2
    assert "is or contains the input" in capsys.readouterr().err
    assert len(find_input_files([corpus_dir])) == 12


# --------------------------------------------------------------------------- dataset checks


def test_check_compatible(corpus):
    ds = corpus["dataset"]
    assert check_compatible(ds, SEQ_LEN, 320).vocab_size == 320
    with pytest.raises(DataError, match=r"seq_len 16 but data\.seq_len is 32"):
        check_compatible(ds, 32, 320)
    with pytest.raises(DataError, match=r"vocabulary \(320\) is larger than model\.vocab_size"):
        check_compatible(ds, SEQ_LEN, 256)
    with pytest.raises(DataError, match=r"seq_len 16 but data\.seq_len is 32"):
        build_train_loader(_cfg(ds, seq_len=32), micro_batch_size=2, dp_rank=0, dp_world=1,
                           vocab_size=320)


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, verify, message", [
    ("no_manifest", "hash", r"manifest\.json not found: .* preparation did not finish"),
    ("missing_shard", "hash", r"shard .*shard\.00000\.mds is missing"),
    ("flipped_byte", "hash", r"shard .*shard\.00000\.mds is corrupted: its xxh64 hash differs"),
    ("truncated", "size", r"shard .* has \d+ bytes, its index says \d+: truncated"),
    ("other_tokenizer", "hash", r"tokenizer\.json does not match the tokenizer hash"),
    ("bad_index", "hash", r"index\.json: cannot read the shard index"),
])
def test_damaged_dataset_is_refused(corpus, tmp_path, damage, verify, message):
    ds = _copy(corpus["dataset"], tmp_path / "ds")
    shard = ds / "train" / "shard.00000.mds"
    if damage == "no_manifest":
        (ds / "manifest.json").unlink()
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "flipped_byte":
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "other_tokenizer":
        train_bpe(_documents(5, seed=9), 300, ds / "tokenizer.json")
    elif damage == "bad_index":
        (ds / "train" / "index.json").write_text("{")
    with pytest.raises(DataError, match=message):
        build_train_loader(_cfg(ds, verify_shards=verify), micro_batch_size=2, dp_rank=0,
                           dp_world=1, vocab_size=320)


def test_hash_once_hashes_until_a_shard_changes(corpus, tmp_path):
    """hash_once: the first start hashes and records each shard's size and mtime; a restart
    only stats (a shard rewritten in place with its old mtime is then trusted, as "size" trusts
    it); a shard whose mtime moved is hashed again."""
    ds = _copy(corpus["dataset"], tmp_path / "ds")
    marker = ds / "train" / "verified_xxh64.json"

    def open_train(verify: str):
        return build_train_loader(_cfg(ds, verify_shards=verify), micro_batch_size=2, dp_rank=0,
                                  dp_world=1, vocab_size=320)

    open_train("hash_once")
    assert marker.is_file()
    shard = ds / "train" / "shard.00000.mds"
    stamp = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    open_train("hash_once")  # recorded as verified, unchanged size and mtime: not read again
    with pytest.raises(DataError, match="is corrupted"):
        open_train("hash")
    os.utime(shard)  # now it looks changed
    with pytest.raises(DataError, match="is corrupted"):
        open_train("hash_once")


def test_blend_requires_one_tokenizer_and_no_val_split_is_reported(corpus, tmp_path):
    src = tmp_path / "src"
    docs = _write_corpus(src, _documents(30, seed=3))
    other_tok = train_bpe(docs, 300, tmp_path / "other.json")
    other = tmp_path / "other"
    prepare_dataset([str(src)], other_tok, SEQ_LEN, other, val_fraction=0, progress=False)
    with pytest.raises(DataError, match=r"different tokenizers"):
        build_train_loader(_cfg(corpus["dataset"], other), micro_batch_size=2, dp_rank=0,
                           dp_world=1, vocab_size=320)
    with pytest.raises(DataError, match=r"has no val split"):
        build_val_loader(_cfg(other), micro_batch_size=2, dp_rank=0, dp_world=1, vocab_size=320)


# --------------------------------------------------------------------------- loader


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        key = np.random.SeedSequence([7, n]).generate_state(4, np.uint64)
        p = permute(np.arange(n), n, key)
        assert sorted(p.tolist()) == list(range(n))
    key = np.random.SeedSequence(1).generate_state(4, np.uint64)
    assert permute(np.arange(1000), 1000, key)[:10].tolist() != list(range(10))


def _positions(loader, steps: int) -> dict[int, int]:
    """Global stream position -> sample index, for the first ``steps`` micro-batches."""
    out = {}
    B, W, r = loader.micro_batch_size, loader.dp_world, loader.dp_rank
    for step in range(steps):
        _, samples = loader.sample_ids(step)
        for j, sample in enumerate(samples.tolist()):
            out[(step * B + j) * W + r] = sample
    return out


def test_dp_ranks_disjoint_cover_epoch_and_tp_peers_agree(corpus):
    ds = corpus["dataset"]
    n = read_manifest(ds).splits["train"].sequences
    B, W = 3, 2
    ranks = [build_train_loader(_cfg(ds), micro_batch_size=B, dp_rank=r, dp_world=W,
                                vocab_size=320) for r in range(W)]
    steps = -(-n // (B * W))
    seen = {}
    for loader in ranks:
        seen.update(_positions(loader, steps))
    epoch0 = [seen[p] for p in range(n)]
    assert sorted(epoch0) == list(range(n))  # each sample once: disjoint and covering
    assert epoch0 != list(range(n))  # shuffled
    first = {r: {seen[p] for p in range(n) if p % W == r} for r in range(W)}
    assert not first[0] & first[1] and len(first[0]) + len(first[1]) == n
    # the batches hold exactly those samples, shifted by one for the labels
    reader = StreamingDataset(local=str(ds / "train"), batch_size=1)
    x, y = next(ranks[1])
    _, samples = ranks[1].sample_ids(0)
    rows = torch.tensor(np.stack([reader.get_item(int(s))["tokens"] for s in samples]),
                        dtype=torch.long)
    assert x.shape == y.shape == (B, SEQ_LEN) and x.dtype == torch.long
    assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    # a tensor-parallel peer passes the same dp_rank and reads the same batches
    peer = build_train_loader(_cfg(ds), micro_batch_size=B, dp_rank=1, dp_world=W, vocab_size=320)
    assert torch.equal(next(peer)[0], x)
    for _ in range(5):
        assert torch.equal(next(peer)[0], next(ranks[1])[0])
    # the next epoch is another permutation
    epoch1 = [seen[p] for p in range(n, min(len(seen), 2 * n))]
    assert epoch1 != epoch0[:len(epoch1)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted_run(corpus, num_workers):
    ds = corpus["dataset"]
    n = read_manifest(ds).splits["train"].sequences
    cfg = _cfg(ds, num_workers=num_workers, shuffle_seed=5)
    kw = dict(micro_batch_size=4, dp_rank=1, dp_world=2, vocab_size=320)
    reference = build_train_loader(_cfg(ds, shuffle_seed=5), **kw)
    run = build_train_loader(cfg, **kw)
    stop = n // 8 + 3  # past the end of the first epoch after resuming
    for _ in range(stop):
        assert torch.equal(next(run)[0], next(reference)[0])
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint file
    resumed = build_train_loader(cfg, **kw)
    resumed.load_state_dict(state)
    for _ in range(n // 8 + 3):
        x, y = next(resumed)
        rx, ry = next(reference)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    run.close()
    resumed.close()


def test_resume_into_other_dp_size_continues_the_same_stream(corpus):
    ds = corpus["dataset"]
    two = [build_train_loader(_cfg(ds), micro_batch_size=2, dp_rank=r, dp_world=2,
                              vocab_size=320) for r in range(2)]
    for _ in range(5):
        for loader in two:
            next(loader)
    one = build_train_loader(_cfg(ds), micro_batch_size=4, dp_rank=0, dp_world=1, vocab_size=320)
    one.load_state_dict(two[0].state_dict())
    for _ in range(3):
        (a, _), (b, _) = next(two[0]), next(two[1])
        merged = torch.stack([a[0], b[0], a[1], b[1]])  # positions 4s, 4s+1, 4s+2, 4s+3
        assert torch.equal(next(one)[0], merged)


def test_resume_state_is_checked(corpus):
    loader = build_train_loader(_cfg(corpus["dataset"]), micro_batch_size=2, dp_rank=0,
                                dp_world=1, vocab_size=320)
    next(loader)
    state = loader.state_dict()
    other = build_train_loader(_cfg(corpus["dataset"], shuffle_seed=99), micro_batch_size=2,
                               dp_rank=0, dp_world=1, vocab_size=320)
    with pytest.raises(DataError, match=r"would not continue the same sample stream"):
        other.load_state_dict(state)
    bigger = build_train_loader(_cfg(corpus["dataset"]), micro_batch_size=4, dp_rank=0,
                                dp_world=1, vocab_size=320)
    with pytest.raises(DataError, match=r"consumed 2 samples, not a multiple of .* = 4"):
        bigger.load_state_dict(state)


def test_rank_layout_and_seed_are_checked(corpus):
    with pytest.raises(DataError, match=r"dp_rank 2 is outside \[0, dp_world=2\)"):
        build_train_loader(_cfg(corpus["dataset"]), micro_batch_size=2, dp_rank=2, dp_world=2,
                           vocab_size=320)
    with pytest.raises(DataError, match=r"micro_batch_size must be >= 1"):
        build_val_loader(_cfg(corpus["dataset"]), micro_batch_size=0, dp_rank=0, dp_world=1,
                         vocab_size=320)
    with pytest.raises(DataError, match=r"data\.shuffle_seed must be >= 0"):
        build_train_loader(_cfg(corpus["dataset"], shuffle_seed=-1), micro_batch_size=2,
                           dp_rank=0, dp_world=1, vocab_size=320)


def test_blend_follows_weights(corpus, tmp_path):
    src = tmp_path / "src"
    _write_corpus(src, _documents(30, seed=4))
    second = tmp_path / "second"
    prepare_dataset([str(src)], corpus["tokenizer"], SEQ_LEN, second, val_fraction=0,
                    progress=False)
    sizes = [read_manifest(p).splits["train"].sequences for p in (corpus["dataset"], second)]
    loader = build_train_loader(_cfg(corpus["dataset"], second, weights=[3.0, 1.0]),
                                micro_batch_size=BLEND_BLOCK // 4, dp_rank=0, dp_world=1,
                                vocab_size=320)
    picks = [loader.sample_ids(step) for step in range(4)]  # one whole blend block
    source = np.concatenate([p[0] for p in picks])
    sample = np.concatenate([p[1] for p in picks])
    assert (source == 0).sum() == 3 * BLEND_BLOCK // 4 and (source == 1).sum() == BLEND_BLOCK // 4
    for s in (0, 1):  # each source walks through whole epochs of its own samples
        mine = sample[source == s]
        assert sorted(mine[:sizes[s]].tolist()) == list(range(sizes[s]))
    x, _ = next(loader)
    assert x.shape == (BLEND_BLOCK // 4, SEQ_LEN)


def test_val_loader_same_batches_on_each_pass(corpus):
    ds = corpus["dataset"]
    n = read_manifest(ds).splits["val"].sequences
    loaders = [build_val_loader(_cfg(ds), micro_batch_size=2, dp_rank=r, dp_world=2,
                                vocab_size=320) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == ((n + 1) // 2 + 1) // 2  # ceil(ceil(n / 2) / 2)
    first = [x for x, _ in loaders[0]]
    assert len(first) == len(loaders[0])
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in loaders[0]]))
    assert not torch.equal(first[0], next(iter(loaders[1]))[0])


# --------------------------------------------------------------------------- processes


def _rank_main(rank: int, world: int, init_file: str, dataset: str, out: str) -> None:
    """One process of a gloo group that reads through the loaders (no RANK/WORLD_SIZE env set)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    # tensor-parallel peers: both ranks are data-parallel rank 0 of 1
    peer = build_train_loader(_cfg(dataset), micro_batch_size=2, dp_rank=0, dp_world=1,
                              vocab_size=320)
    # data-parallel ranks: rank r of 2
    dp = build_train_loader(_cfg(dataset), micro_batch_size=2, dp_rank=rank, dp_world=world,
                            vocab_size=320)
    val = build_val_loader(_cfg(dataset), micro_batch_size=2, dp_rank=rank, dp_world=world,
                           vocab_size=320)
    result = {"peer": [next(peer)[0].tolist() for _ in range(3)],
              "dp": [s for step in range(4) for s in dp.sample_ids(step)[1].tolist()],
              "dp_batch": next(dp)[0].tolist(), "val_batches": len(val)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_loaders_in_a_gloo_process_group(corpus, tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"),
                                                   str(corpus["dataset"]), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["peer"] == r1["peer"]
    assert not set(r0["dp"]) & set(r1["dp"]) and len(set(r0["dp"] + r1["dp"])) == 16
    assert r0["dp_batch"] != r1["dp_batch"] and r0["val_batches"] == r1["val_batches"]


def _independent_main(index: int, dataset: str, out: str) -> None:
    """A process with a launcher's environment but no process group (streaming reads the env)."""
    import os
    os.environ.update(RANK=str(index), WORLD_SIZE="3", LOCAL_RANK=str(index), LOCAL_WORLD_SIZE="3")
    loader = build_train_loader(_cfg(dataset), micro_batch_size=2, dp_rank=0, dp_world=1,
                                vocab_size=320)
    batches = [next(loader)[0].tolist() for _ in range(3)]
    assert os.environ["RANK"] == str(index)  # restored after streaming read it
    Path(out, f"proc{index}.json").write_text(json.dumps(batches))


def test_a_lost_shared_memory_race_is_retried_with_new_streams(corpus, monkeypatch):
    """Losing the shared-memory registration race to another process (FileExistsError) is
    retried; streaming has already applied weights to that attempt's streams, so a retry with
    the same Stream objects would fail with a conflicting-weights error."""
    import streaming.base.dataset as streaming_dataset

    real, calls = streaming_dataset.get_shm_prefix, []

    def lose_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise FileExistsError("another process registered this prefix first")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming_dataset, "get_shm_prefix", lose_once)
    loader = build_train_loader(_cfg(corpus["dataset"]), micro_batch_size=2, dp_rank=0, dp_world=1,
                                vocab_size=320)
    assert len(calls) == 2 and next(loader)[0].shape[0] == 2


@pytest.mark.slow
def test_independent_processes_on_one_machine(corpus, tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_independent_main,
                         args=(i, str(corpus["dataset"]), str(tmp_path))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = [json.loads((tmp_path / f"proc{i}.json").read_text()) for i in range(3)]
    assert results[0] == results[1] == results[2]


# --------------------------------------------------------------------------- embedded corpus


@pytest.mark.slow
def test_embedded_corpus_is_built_once_and_loads(tmp_path_factory, capfd):
    import time

    from mythos_scale.data.embedded import ensure_embedded_dataset, stdlib_source_files

    files = stdlib_source_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    cache = tmp_path_factory.getbasetemp() / "embedded-cache"  # shared with test_cli_user_paths
    built_before = any(cache.glob("embedded/*-v512-L32/manifest.json"))
    path = ensure_embedded_dataset(cache, seq_len=32, vocab_size=512)
    if not built_before:  # the build says where it writes, and shows its progress
        err = capfd.readouterr().err
        assert f"building the embedded corpus ({len(files)} standard-library files" in err
        assert str(path) in err and "train the tokenizer: 100%" in err and "tokenize:" in err
    m = read_manifest(path)
    assert m.seq_len == 32 and m.vocab_size <= 512
    assert m.splits["train"].sequences > 1000 and m.splits["val"].sequences > 0
    start = time.perf_counter()
    assert ensure_embedded_dataset(cache, seq_len=32, vocab_size=512) == path
    assert time.perf_counter() - start < 1.0  # cached
    assert "building" not in capfd.readouterr().err
    cfg = DataConfig(cache_dir=str(cache), seq_len=32)  # sources default to "embedded"
    x, y = next(build_train_loader(cfg, micro_batch_size=2, dp_rank=0, dp_world=1,
                                   vocab_size=512))
    assert x.shape == (2, 32) and int(x.max()) < m.vocab_size
    # the tokens decode back to standard-library source text
    segments = np.split(x[0].numpy(), np.flatnonzero(x[0].numpy() == m.eos_id))
    longest = max(segments, key=len).tolist()
    text = Tokenizer.from_file(str(path / "tokenizer.json")).decode(longest)[2:-2]
    assert len(text) > 10 and any(text in f.read_text() for f in files)

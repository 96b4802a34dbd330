"""Documents -> token stream (EOS after each document) -> packed sequences -> MDS shards.

Sequence ``i`` of a split holds tokens ``[i*L, i*L + L + 1)`` of the split's token stream
(L = seq_len): consecutive sequences share one boundary token, so that every token after the
first is a training target exactly once (inputs ``s[:-1]``, labels ``s[1:]``).  The partial
sequence at the end of the stream is dropped and counted in the manifest.

Documents go to the validation split by an exact, evenly spread rule: document ``i`` (in input
order) is validation when ``floor((i+1) f) > floor(i f)``.

Everything is written into a staging folder next to ``--out`` and renamed into place after the
manifest, so an interrupted run never leaves a folder that looks complete.  ``--overwrite``
replaces only a dataset this tool wrote (see :func:`check_output_folder`); an ``--out`` that is,
holds or lies inside an input is refused with or without it.  For an object-store
``--out`` (``s3://...`` etc.) streaming uploads each shard as it is written and the manifest is
uploaded last; readers ignore a dataset without a manifest.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from streaming import MDSWriter
from streaming.base.storage import CloudUploader
from tqdm import tqdm

from mythos_scale.data.documents import ReadStats, find_input_files, read_documents
from mythos_scale.data.manifest import MANIFEST_NAME, TOKENIZER_NAME, DataError, Manifest, SplitStats, read_manifest
from mythos_scale.data.tokenizer import encode_documents, encode_with, init_encode_worker, load_tokenizer

SHARD_HASHES = ["xxh64"]  # stored in each split's index.json, checked by the loader
DOCS_PER_TASK = 256
CHARS_PER_TASK = 1 << 18
_SHARD_NAME = re.compile(r"shard\.\d+\.mds(\.\w+)?")  # streaming's shard files (maybe compressed)


def is_url(path: str) -> bool:
    return len(urllib.parse.urlparse(str(path)).scheme) > 1  # "C:" is a drive, not a scheme


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class _Packer:
    """Cuts one split's token stream into ``seq_len + 1`` token samples for an MDSWriter."""

    def __init__(self, writer: MDSWriter, seq_len: int, dtype: str, eos_id: int) -> None:
        self.writer, self.seq_len, self.dtype = writer, seq_len, np.dtype(dtype)
        self.eos = np.array([eos_id], dtype=np.uint32)
        self.pending: list[np.ndarray] = [np.empty(0, dtype=np.uint32)]
        self.pending_len = 0
        self.stats = SplitStats()

    def add(self, tokens: np.ndarray) -> None:
        self.pending += [tokens, self.eos]
        self.pending_len += len(tokens) + 1
        self.stats.documents += 1
        self.stats.tokens += len(tokens) + 1
        if self.pending_len > 64 * (self.seq_len + 1):
            self._flush()

    def _flush(self) -> None:
        stream = np.concatenate(self.pending).astype(self.dtype)
        n, L = max(0, (len(stream) - 1) // self.seq_len), self.seq_len
        for i in range(n):
            self.writer.write({"tokens": stream[i * L:i * L + L + 1]})
        self.stats.sequences += n
        self.pending = [stream[n * L:]]
        self.pending_len = len(self.pending[0])

    def finish(self) -> SplitStats:
        self._flush()
        # The first pending token already ended the last written sequence.
        self.stats.dropped_tail_tokens = self.pending_len - (1 if self.stats.sequences else 0)
        self.writer.finish()
        return self.stats


def _batched(documents: Iterator[str]) -> Iterator[list[str]]:
    """Tasks for the tokenizer workers: up to DOCS_PER_TASK documents or CHARS_PER_TASK chars."""
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if len(batch) == DOCS_PER_TASK or chars >= CHARS_PER_TASK:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _is_val(index: int, fraction: float) -> bool:
    return int((index + 1) * fraction) > int(index * fraction)


def prepare_dataset(inputs: list[str], tokenizer: str | Path, seq_len: int, out: str | Path, *,
                    val_fraction: float = 0.01, workers: int = 1, text_field: str = "text",
                    eos_token: str | None = None, shard_size: int | str = "32mb",
                    overwrite: bool = False, progress: bool = True) -> Manifest:
    """Tokenize ``inputs``, pack sequences of ``seq_len + 1`` tokens, write train/val MDS shards."""
    if seq_len < 1:
        raise DataError(f"--seq-len must be >= 1, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    tok = load_tokenizer(tokenizer, eos_token)
    files = find_input_files(inputs)
    out = str(out)
    remote = out.rstrip("/") if is_url(out) else None
    final = None if remote else Path(out).expanduser()
    if final is not None:
        # the folders holding the input files stand for the files (far fewer paths to resolve)
        given = [Path(i).expanduser() for i in inputs if not set("*?[") & set(i)]
        check_output_folder(final, given + sorted({f.parent for f in files}), overwrite)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging = Path(tempfile.mkdtemp(prefix="mythos-prepare-"))

    dtype = token_dtype(tok.vocab_size)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    pool = None
    try:
        if workers > 1:  # forked before this process starts any thread (writers may)
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=init_encode_worker, initargs=(str(tok.path),))
        packers = {}
        for split in splits:
            local = str(staging / split)
            writer = MDSWriter(out=(local, f"{remote}/{split}") if remote else local,
                               columns={"tokens": f"ndarray:{dtype}:{seq_len + 1}"},
                               hashes=SHARD_HASHES, size_limit=shard_size, exist_ok=False)
            packers[split] = _Packer(writer, seq_len, dtype, tok.eos_id)

        read_stats = ReadStats()
        tasks = _batched(read_documents(files, text_field, read_stats))
        if pool is not None:
            encoded = pool.imap(encode_documents, tasks)
        else:
            encoded = (encode_with(tok.tokenizer, task) for task in tasks)

        index = 0
        with tqdm(desc="tokenize", unit="doc", disable=not progress) as bar:
            for batch in encoded:
                for tokens in batch:
                    if len(tokens):
                        packers["val" if _is_val(index, val_fraction) else "train"].add(tokens)
                        index += 1
                bar.update(len(batch))
        stats = {split: packer.finish() for split, packer in packers.items()}
        _check_outcome(stats, read_stats, seq_len)
        if read_stats.skipped:
            shown = "\n  ".join(read_stats.skipped[:5])
            more = len(read_stats.skipped) - 5
            print(f"skipped {len(read_stats.skipped)} binary or non-UTF-8 file(s):\n  {shown}"
                  + (f"\n  ... and {more} more" if more > 0 else ""))

        manifest = Manifest(
            seq_len=seq_len, vocab_size=tok.vocab_size, eos_id=tok.eos_id, dtype=dtype,
            tokenizer_sha256=tok.sha256, hashes=SHARD_HASHES, splits=stats,
            inputs={"files": read_stats.files, "documents": read_stats.documents,
                    "skipped_files": len(read_stats.skipped), "text_field": text_field,
                    "val_fraction": val_fraction})
        shutil.copyfile(tok.path, staging / TOKENIZER_NAME)
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        if remote:
            uploader = CloudUploader.get(out=(str(staging), remote), exist_ok=True)
            uploader.upload_file(TOKENIZER_NAME)
            uploader.upload_file(MANIFEST_NAME)  # last: its presence marks the dataset complete
            shutil.rmtree(staging, ignore_errors=True)
        else:
            move_into_place(staging, final)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()


def _check_outcome(stats: dict[str, SplitStats], read_stats: ReadStats, seq_len: int) -> None:
    if read_stats.documents == 0:
        raise DataError(f"the inputs hold no text: {read_stats.files} file(s) read, "
                        f"{len(read_stats.skipped)} skipped as binary or non-UTF-8"
                        + (f" (first: {read_stats.skipped[0]})" if read_stats.skipped else ""))
    for split, s in stats.items():
        if s.sequences == 0:
            hint = ", raise --val-fraction or pass --val-fraction 0" if split == "val" else ""
            raise DataError(f"the {split} split got {s.tokens} tokens, fewer than one sequence "
                            f"of --seq-len {seq_len} + 1 tokens; give more input, lower "
                            f"--seq-len{hint}")


def _foreign_entry(folder: Path) -> str | None:
    """Why ``folder`` is not a dataset written by :func:`prepare_dataset` (None if it is one):
    it must hold a valid manifest, and nothing but the manifest, the tokenizer copy and the
    manifest's split folders of MDS shards."""
    if not (folder / MANIFEST_NAME).is_file():
        return f"it has no {MANIFEST_NAME}"
    try:
        manifest = read_manifest(folder)
    except DataError as exc:
        return str(exc)
    expected = {MANIFEST_NAME, TOKENIZER_NAME, *manifest.splits}
    for entry in sorted(folder.iterdir()):
        if entry.name not in expected:
            return f"{entry} is not part of a prepared dataset"
        if entry.name in manifest.splits:
            if not entry.is_dir() or entry.is_symlink():
                return f"{entry} is not a folder of shards"
            for item in sorted(entry.iterdir()):
                if not (item.is_file() and (item.name == "index.json"
                                            or _SHARD_NAME.fullmatch(item.name))):
                    return f"{item} is not an MDS shard or index"
    return None


def check_output_folder(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an ``--out`` that would lose or mix data: one that is an input, holds an input or
    lies inside an input folder (always), or exists and is not empty, unless ``overwrite`` is
    set and it is a dataset this tool wrote (nothing else is ever replaced)."""
    if out.is_file():
        raise DataError(f"output {out} is a file, not a folder")
    target = out.resolve()
    for item in inputs:
        source = item.resolve()
        if source == target or target in source.parents:
            raise DataError(f"--out {out} is or contains the input {item}: writing there would "
                            f"replace or mix with the inputs; choose an --out outside them")
        if source.is_dir() and source in target.parents:
            raise DataError(f"--out {out} is inside {item}, which holds inputs: the dataset "
                            f"would be read as input next time; choose an --out outside them")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"output {out} already exists and is not empty; pass --overwrite to "
                        f"replace it (only a dataset prepared by this tool is ever replaced)")
    reason = _foreign_entry(out)
    if reason is not None:
        raise DataError(f"--overwrite replaces only a dataset prepared by this tool, and {out} "
                        f"is not one ({reason}); nothing was changed: remove it yourself or "
                        f"choose another --out")


def move_into_place(staging: Path, final: Path) -> None:
    """Rename a finished ``staging`` folder to ``final``, replacing what was there (checked)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

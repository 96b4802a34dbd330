"""The embedded default corpus: the installed Python standard library's own ``.py`` sources.

Every machine that runs this code has it, so training works with no download.  The corpus (test
suites, bundled packages and demos left out, at most ``MAX_CORPUS_BYTES``) trains a byte-level
BPE and is prepared into train/val shards once per (Python version, vocab size, seq_len) under
``<cache_dir>/embedded``; later calls, from any process, reuse it.  A build says where it writes
and shows its progress: it takes about a minute.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from mythos_scale.data.documents import ReadStats, read_documents
from mythos_scale.data.manifest import MANIFEST_NAME
from mythos_scale.data.prepare import check_output_folder, move_into_place, prepare_dataset
from mythos_scale.data.tokenizer import train_bpe

MAX_CORPUS_BYTES = 16 * 1024 * 1024
VAL_FRACTION = 0.02
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
                  "lib2to3", "turtledemo", "ensurepip", "__pycache__"}


def stdlib_source_files(max_bytes: int = MAX_CORPUS_BYTES) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _EXCLUDED_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def embedded_dataset_dir(cache_dir: str | Path, seq_len: int, vocab_size: int) -> Path:
    version = "".join(map(str, sys.version_info[:3]))
    return Path(cache_dir).expanduser() / "embedded" / f"py{version}-v{vocab_size}-L{seq_len}"


def ensure_embedded_dataset(cache_dir: str | Path, seq_len: int, vocab_size: int,
                            workers: int = 1, progress: bool = True) -> Path:
    """Return the prepared embedded dataset for ``seq_len`` and ``vocab_size``, building it first
    if absent.  Safe to call from many processes at once: one builds, the others wait.

    One worker by default: the tokenizer then runs in this process (threaded by the tokenizers
    library), so a trainer process that calls this never forks."""
    dataset = embedded_dataset_dir(cache_dir, seq_len, vocab_size)
    if (dataset / MANIFEST_NAME).is_file():
        return dataset
    dataset.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dataset.parent / ".build.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that is building the embedded corpus into {dataset}",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if (dataset / MANIFEST_NAME).is_file():  # built by another process while we waited
            return dataset
        files = stdlib_source_files()
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"building the embedded corpus ({len(files)} standard-library files, {megabytes:.1f} MB) "
              f"into {dataset}: once for this Python, vocab size and seq_len; about a minute",
              file=sys.stderr, flush=True)
        tokenizer = dataset.parent / f"{dataset.name.rsplit('-L', 1)[0]}-tokenizer.json"
        if not tokenizer.is_file():
            read = tqdm(files, desc="train the tokenizer", unit="file", disable=not progress)
            train_bpe(read_documents(read, "text", ReadStats()), vocab_size, tokenizer)
        prepare_dataset([str(f) for f in files], tokenizer, seq_len, dataset,
                        val_fraction=VAL_FRACTION, workers=workers, progress=progress)
    finally:
        lock.release()
    return dataset


def copy_dataset(source: Path, out: Path, overwrite: bool = False) -> Path:
    """Copy the prepared dataset ``source`` to the folder ``out`` (staged next to it, then renamed
    into place); an ``out`` that already holds this very dataset is left as it is."""
    manifest = out / MANIFEST_NAME
    if manifest.is_file() and manifest.read_text() == (source / MANIFEST_NAME).read_text():
        return out
    check_output_folder(out, [source], overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out

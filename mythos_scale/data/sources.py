"""The datasets a run reads (``data.sources``): where each is (a folder, an object-store URL,
the embedded corpus), whether it fits the run (sequence length, vocabulary, one tokenizer for
a blend) and whether its shards are the ones prepared (hashes, per ``data.verify``).  The
order they are read in is :mod:`.order`; the loaders are :mod:`.loader`."""


from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from filelock import FileLock
from streaming.base.hashing import get_hash
from streaming.base.storage import CloudDownloader

from mythos_scale.config import DataConfig
from mythos_scale.data.embedded import ensure_embedded_dataset
from mythos_scale.data.manifest import MANIFEST_NAME, TOKENIZER_NAME, DataError, Manifest, check_compatible
from mythos_scale.data.prepare import is_url
from mythos_scale.data.tokenizer import file_sha256

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    name: str  # the path as configured
    root: Path  # local folder holding manifest.json (a download cache for remote datasets)
    remote: str | None
    manifest: Manifest
    weight: float = 1.0

    def fingerprint(self) -> dict[str, Any]:
        """What the sample stream depends on (not the path: a dataset may be moved)."""
        return {"weight": self.weight,
                "sequences": {k: v.sequences for k, v in self.manifest.splits.items()},
                "tokenizer_sha256": self.manifest.tokenizer_sha256}


def resolve_dataset(path: str, cache_dir: str | Path, seq_len: int, vocab_size: int) -> Path:
    """The local folder holding the manifest of ``path``: a prepared dataset folder, an
    object-store URL (its manifest and tokenizer are downloaded into ``cache_dir``), or
    ``"embedded"`` (the default corpus, built on first use)."""
    if path == EMBEDDED:
        return ensure_embedded_dataset(cache_dir, seq_len, vocab_size)
    if is_url(path):
        key = hashlib.sha1(path.encode()).hexdigest()[:16]
        root = Path(cache_dir).expanduser() / "remote" / key
        _download_once_per_node(path, root)
        return root
    return Path(path).expanduser()


def node_layout() -> tuple[int, int, int, int]:
    """``(rank, world size, rank on this node, ranks on this node)``, ranks grouped by host name:
    collective when torch.distributed is up; ``(0, 1, 0, 1)`` for a process on its own."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, 0, 1
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    local = [r for r in range(world) if hosts[r] == hosts[rank]]
    return rank, world, local.index(rank), len(local)


def _download_once_per_node(url: str, root: Path) -> None:
    """Fetch the manifest and tokenizer of ``url`` into ``root``: fresh on every start (the remote
    may be rewritten), once per node.  The node's first rank downloads while the others wait for
    it (a collective); a failed download is raised on every rank.  The download itself holds a
    file lock on ``root`` (other jobs or nodes sharing the cache wait on it) and writes temporary
    files renamed into place, so no process ever reads a partial or a mixed pair of files."""
    _, world, local_rank, _ = node_layout()
    problem = _download_remote_files(url, root) if local_rank == 0 else None
    if world > 1:
        problems: list[str | None] = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise DataError(problem)


def _download_remote_files(url: str, root: Path) -> str | None:
    """Download ``url``'s manifest and tokenizer into ``root`` under its lock; what went wrong, or None."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".download.lock")):
        for name in (MANIFEST_NAME, TOKENIZER_NAME):
            part = root / f".{name}.{socket.gethostname()}.{os.getpid()}.part"
            part.unlink(missing_ok=True)
            try:
                CloudDownloader.direct_download(f"{url.rstrip('/')}/{name}", str(part))
                os.replace(part, root / name)
            except Exception as exc:  # each object store raises its own error types
                part.unlink(missing_ok=True)
                return f"cannot download {url}/{name}: {exc}"
    return None


def open_source(name: str, weight: float, cfg: DataConfig, vocab_size: int) -> Source:
    root = resolve_dataset(name, cfg.cache_dir, cfg.seq_len, vocab_size)
    manifest = check_compatible(root, cfg.seq_len, vocab_size)
    tokenizer = root / TOKENIZER_NAME
    if not tokenizer.is_file():
        raise DataError(f"{tokenizer} is missing: the dataset {name} has no copy of its tokenizer")
    if file_sha256(tokenizer) != manifest.tokenizer_sha256:
        raise DataError(f"{tokenizer} does not match the tokenizer hash in {root / MANIFEST_NAME}: "
                        f"the tokens of {name} were made by another tokenizer")
    return Source(name=name, root=root, remote=name.rstrip("/") if is_url(name) else None,
                   manifest=manifest, weight=weight)


def open_sources(cfg: DataConfig, vocab_size: int) -> list[Source]:
    names = [s.path for s in cfg.sources]
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"data.sources lists {name!r} twice; give it one entry with the "
                            f"summed weight")
    sources = [open_source(s.path, s.weight, cfg, vocab_size) for s in cfg.sources]
    first = sources[0]
    for other in sources[1:]:
        if other.manifest.tokenizer_sha256 != first.manifest.tokenizer_sha256:
            raise DataError(f"data.sources: {other.name} and {first.name} were tokenized with "
                            f"different tokenizers; blended sources must share one")
    return sources


VERIFIED_NAME = "verified_xxh64.json"  # hash_once: the size and mtime of each shard when it was hashed


def verify_split(source: Source, split: str, seq_len: int, mode: str) -> None:
    """Check a local split's shards against its index.json: present, right size, sample counts
    as in the manifest (every mode: a stat per shard), and the xxh64 recorded when they were
    written: on every start (``hash``), or once (``hash_once``: until a shard's size or mtime
    changes, as recorded next to the shards in ``verified_xxh64.json``)."""
    folder = source.root / split
    index_file = folder / "index.json"
    try:
        index = json.loads(index_file.read_text())
        shards = index["shards"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{index_file}: cannot read the shard index ({exc})") from None
    expected = {"tokens": f"ndarray:{source.manifest.dtype}:{seq_len + 1}", **source.manifest.extra_columns}
    samples = 0
    files = {"index.json": _file_stamp(index_file)}
    for shard in shards:
        columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        if columns != expected:
            raise DataError(f"{index_file}: shards hold columns {columns}, the manifest promises {expected}")
        raw = shard["raw_data"]
        path = folder / raw["basename"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing")
        if path.stat().st_size != raw["bytes"]:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes, its index says "
                            f"{raw['bytes']}: truncated or replaced")
        files[raw["basename"]] = _file_stamp(path)
        samples += shard["samples"]
    if samples != source.manifest.splits[split].sequences:
        raise DataError(f"{index_file} lists {samples} sequences, the manifest "
                        f"{source.root / MANIFEST_NAME} says "
                        f"{source.manifest.splits[split].sequences}")
    marker = folder / VERIFIED_NAME
    if mode == "size" or mode == "hash_once" and _read_json(marker) == files:
        return
    for shard in shards:
        path = folder / shard["raw_data"]["basename"]
        if get_hash("xxh64", path.read_bytes()) != shard["raw_data"]["hashes"]["xxh64"]:
            raise DataError(f"shard {path} is corrupted: its xxh64 hash differs from {index_file}")
    if mode == "hash_once":
        try:  # atomic: ranks verifying the same split at once each write the same record
            tmp = marker.with_name(f".{VERIFIED_NAME}.{os.getpid()}")
            tmp.write_text(json.dumps(files))
            os.replace(tmp, marker)
        except OSError as exc:
            log.warning("cannot record that %s was verified (%s): it will be hashed again on the next start",
                        folder, exc)


def _file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

"""Per-data-parallel-rank loaders over prepared datasets, with exact mid-epoch resume.

Reading is streaming's ``StreamingDataset`` (shard index, downloads from object stores into a
local cache with hash validation, random access to samples).  The order of samples is ours, a
pure function of ``(seed, position)``, because streaming's own iteration partitions by global
rank (read from environment variables) and resumes by a global sample count per epoch, whereas
this trainer needs: sharding by *data-parallel* rank only (the tensor-parallel ranks of one
replica pass the same ``dp_rank`` and read the same samples), endless epochs, weighted blends
of datasets, and resume that is exact, even into a different data-parallel size.

The global sample stream.  Position ``k = 0, 1, 2, ...`` of the stream names one sample:

- blending: positions come in blocks of ``BLEND_BLOCK``; each block holds every source in
  proportion to its weight (largest-remainder quotas), in a seeded random order.  The ``c``-th
  position given to source ``s`` reads sample ``c mod n_s`` of epoch ``c // n_s`` of that source;
- shuffling: within an epoch, source ``s`` reads its samples in a seeded pseudo-random
  permutation (a Feistel network keyed by ``(seed, s, epoch)``): O(1) memory, random access;
- sharding: data-parallel rank ``r`` of ``W`` takes positions ``k = (step * B + j) * W + r``,
  ``j < B``, for its ``step``-th micro-batch.  At every step the ranks together have read the
  positions ``[0, steps * B * W)``: disjoint, and together one contiguous stretch of the stream.

So a batch is ``batch_at(step)``, a pure function, and the resume state is the number of
samples consumed by all ranks together.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from streaming import Stream, StreamingDataset
from streaming.base.hashing import get_hash
from streaming.base.storage import CloudDownloader
from torch.utils.data import DataLoader, Dataset, Sampler

from mythos_scale.config import DataConfig
from mythos_scale.data.embedded import ensure_embedded_dataset
from mythos_scale.data.manifest import MANIFEST_NAME, TOKENIZER_NAME, DataError, Manifest, check_compatible
from mythos_scale.data.prepare import is_url
from mythos_scale.data.tokenizer import file_sha256

log = logging.getLogger(__name__)

BLEND_BLOCK = 4096
EMBEDDED = "embedded"
_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
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
        for name in (MANIFEST_NAME, TOKENIZER_NAME):  # always fresh: the remote may be rewritten
            (root / name).unlink(missing_ok=True)
            try:
                CloudDownloader.direct_download(f"{path.rstrip('/')}/{name}", str(root / name))
            except Exception as exc:  # each object store raises its own error types
                raise DataError(f"cannot download {path}/{name}: {exc}") from None
        return root
    return Path(path).expanduser()


def _open_source(name: str, weight: float, cfg: DataConfig, vocab_size: int) -> _Source:
    root = resolve_dataset(name, cfg.cache_dir, cfg.seq_len, vocab_size)
    manifest = check_compatible(root, cfg.seq_len, vocab_size)
    tokenizer = root / TOKENIZER_NAME
    if not tokenizer.is_file():
        raise DataError(f"{tokenizer} is missing: the dataset {name} has no copy of its tokenizer")
    if file_sha256(tokenizer) != manifest.tokenizer_sha256:
        raise DataError(f"{tokenizer} does not match the tokenizer hash in {root / MANIFEST_NAME}: "
                        f"the tokens of {name} were made by another tokenizer")
    return _Source(name=name, root=root, remote=name.rstrip("/") if is_url(name) else None,
                   manifest=manifest, weight=weight)


def _open_sources(cfg: DataConfig, vocab_size: int) -> list[_Source]:
    names = [s.path for s in cfg.sources]
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"data.sources lists {name!r} twice; give it one entry with the "
                            f"summed weight")
    sources = [_open_source(s.path, s.weight, cfg, vocab_size) for s in cfg.sources]
    first = sources[0]
    for other in sources[1:]:
        if other.manifest.tokenizer_sha256 != first.manifest.tokenizer_sha256:
            raise DataError(f"data.sources: {other.name} and {first.name} were tokenized with "
                            f"different tokenizers; blended sources must share one")
    return sources


VERIFIED_NAME = "verified_xxh64.json"  # hash_once: the size and mtime of each shard when it was hashed


def _verify_split(source: _Source, split: str, seq_len: int, mode: str) -> None:
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
    expected = f"ndarray:{source.manifest.dtype}:{seq_len + 1}"
    samples = 0
    files = {"index.json": _file_stamp(index_file)}
    for shard in shards:
        if shard.get("column_encodings") != [expected]:
            raise DataError(f"{index_file}: shards hold {shard.get('column_encodings')}, "
                            f"the manifest promises [{expected!r}]")
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


# --------------------------------------------------------------------------- streaming


@contextmanager
def _streaming_world() -> Iterator[None]:
    """Describe this process to StreamingDataset, which reads the process layout from env vars.

    It uses the layout only to share per-node state (shared memory named by a prefix registered
    by the node's local leader, with ``torch.distributed`` barriers around it when initialized);
    the order of samples is ours.  So: with torch.distributed up, give it the true layout (every
    rank must then build the dataset, in the same order); without, this process is on its own.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        hosts: list[Any] = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        local = [r for r in range(world) if hosts[r] == hosts[rank]]
        values = (rank, world, local.index(rank), len(local))
    else:
        values = (0, 1, 0, 1)
    saved = {k: os.environ.get(k) for k in _WORLD_ENV}
    os.environ.update({k: str(v) for k, v in zip(_WORLD_ENV, values)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _open_reader(sources: list[_Source], split: str, cfg: DataConfig) -> StreamingDataset:
    for source in sources:
        if source.manifest.splits.get(split) is None:
            raise DataError(f"{source.name} has no {split} split (prepared with "
                            f"--val-fraction 0?)")
        if source.remote is None:
            _verify_split(source, split, cfg.seq_len, cfg.verify_shards)
    reader = _streaming_dataset([(f"{s.remote}/{split}" if s.remote else None, str(s.root / split))
                                 for s in sources])
    for source, samples in zip(sources, reader.samples_per_stream.tolist()):
        if samples != source.manifest.splits[split].sequences:
            raise DataError(f"{source.name}/{split}: the shard index lists {samples} sequences, "
                            f"its manifest {source.manifest.splits[split].sequences}")
    return reader


def _streaming_dataset(remote_local: list[tuple[str | None, str]]) -> StreamingDataset:
    """A StreamingDataset over ``(remote, local)`` streams.  Independent processes may register a
    shared-memory prefix at the same instant; a process on its own can retry, a process group
    cannot (the attempt is collective).  Each attempt gets new Stream objects: a failed one leaves
    its streams with defaults applied, which the next would refuse as conflicting weights."""
    retries = 0 if dist.is_available() and dist.is_initialized() else 10
    for attempt in itertools.count():
        try:
            with _streaming_world():
                return StreamingDataset(streams=[Stream(remote=remote, local=local) for remote, local in remote_local],
                                        validate_hash="xxh64", shuffle=False, batch_size=1)
        except FileExistsError:
            if attempt == retries:
                raise
            time.sleep(random.uniform(0.01, 0.1))
        except ValueError as exc:
            if "Reused local directory" not in str(exc):
                raise
            raise DataError(
                f"{exc}\nAnother live job reads the same download cache, or a crashed one left "
                f"its shared memory behind; in the latter case call streaming.base.util."
                f"clean_stale_shared_memory() once, with no job running") from None


def _read_rows(reader: StreamingDataset,
               sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([reader.get_item(int(i))["tokens"] for i in sample_ids])
    tokens = torch.from_numpy(rows.astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# --------------------------------------------------------------------------- sample order


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: np.ndarray) -> np.ndarray:
    """A keyed pseudo-random bijection of ``[0, n)`` applied to ``index``: a Feistel network on
    the smallest even-bit-width domain holding ``n``, cycle-walking values that land past ``n``."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for round_key in key:
            left, right = right, left ^ (_splitmix64(right ^ round_key) & mask)
        return (left << shift) | right

    out = rounds(index.astype(np.uint64))
    while (outside := out >= n).any():
        out[outside] = rounds(out[outside])
    return out.astype(np.int64)


class _SampleOrder:
    """Position in the global stream -> (source, sample index within that source)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, names: list[str]) -> None:
        self.sizes, self.seed = sizes, seed
        share = np.asarray(weights, dtype=np.float64) / sum(weights) * BLEND_BLOCK
        quotas = np.floor(share).astype(np.int64)
        quotas[np.argsort(quotas - share)[:BLEND_BLOCK - quotas.sum()]] += 1  # largest remainders
        for name, quota in zip(names, quotas):
            if quota == 0:
                raise DataError(f"data.sources: the weight of {name} is below 1/{BLEND_BLOCK} of "
                                f"the total; it would never be read")
        self.quotas = quotas
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._keys: dict[tuple[int, int], np.ndarray] = {}

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The source of each slot of a blend block, and its rank among its source's slots."""
        if block not in self._blocks:
            source = np.repeat(np.arange(len(self.quotas)), self.quotas)
            if len(self.quotas) > 1:
                np.random.default_rng([self.seed, block]).shuffle(source)
            rank = np.empty_like(source)
            for s in range(len(self.quotas)):
                rank[source == s] = np.arange(self.quotas[s])
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[block] = (source, rank)
        return self._blocks[block]

    def _key(self, source: int, epoch: int) -> np.ndarray:
        if (source, epoch) not in self._keys:
            if len(self._keys) >= 16:
                self._keys.pop(next(iter(self._keys)))
            self._keys[source, epoch] = np.random.SeedSequence(
                [self.seed, source, epoch]).generate_state(4, np.uint64)
        return self._keys[source, epoch]

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        source = np.empty_like(positions)
        count = np.empty_like(positions)
        blocks, slots = np.divmod(positions, BLEND_BLOCK)
        for block in np.unique(blocks):
            sel = blocks == block
            block_source, block_rank = self._block(int(block))
            source[sel] = block_source[slots[sel]]
            count[sel] = block * self.quotas[source[sel]] + block_rank[slots[sel]]
        sample = np.empty_like(positions)
        for s, n in enumerate(self.sizes):
            sel = source == s
            epoch, offset = np.divmod(count[sel], n)
            for e in np.unique(epoch):
                in_epoch = epoch == e
                idx = np.flatnonzero(sel)[in_epoch]
                sample[idx] = permute(offset[in_epoch], n, self._key(s, int(e)))
        return source, sample


# --------------------------------------------------------------------------- loaders


def _check_layout(micro_batch_size: int, dp_rank: int, dp_world: int) -> None:
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= dp_rank < dp_world:
        raise DataError(f"dp_rank {dp_rank} is outside [0, dp_world={dp_world})")


class _StepBatches(Dataset):
    """Map-style view for DataLoader workers: item ``step`` is the batch of that step."""

    def __init__(self, loader: TrainLoader) -> None:
        self.loader = loader

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader.batch_at(step)


class _CountFrom(Sampler):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class TrainLoader:
    """Endless ``(input_ids, labels)`` micro-batches, LongTensors of shape (B, seq_len), for one
    data-parallel rank.  ``state_dict`` / ``load_state_dict`` resume exactly where it stopped.

    ``num_workers > 0`` (data.num_workers) computes batches ahead in DataLoader worker processes;
    worth it only when reads are slow (object store, cold disk): from local shards one process
    reads several million tokens/s.  Call ``close()`` when done to stop the workers promptly.
    """

    def __init__(self, reader: StreamingDataset, sources: list[_Source], *, micro_batch_size: int,
                 dp_rank: int, dp_world: int, seed: int, num_workers: int = 0) -> None:
        _check_layout(micro_batch_size, dp_rank, dp_world)
        if seed < 0:
            raise DataError(f"data.shuffle_seed must be >= 0, got {seed}")
        self.reader, self.sources = reader, sources
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        self.seed, self.num_workers = seed, num_workers
        self.step = 0  # micro-batches handed out by this rank
        sizes = [s.manifest.splits["train"].sequences for s in sources]
        self.order = _SampleOrder(sizes, [s.weight for s in sources], seed,
                                  [s.name for s in sources])
        self._offsets = reader.sample_offset_per_stream
        self._prefetch: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def sample_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index within it) of each row of micro-batch ``step`` of this rank."""
        j = np.arange(self.micro_batch_size, dtype=np.int64)
        return self.order((step * self.micro_batch_size + j) * self.dp_world + self.dp_rank)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, sample = self.sample_ids(step)
        return _read_rows(self.reader, self._offsets[source] + sample)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers == 0:
            batch = self.batch_at(self.step)
        else:
            if self._prefetch is None:
                self._prefetch = iter(DataLoader(_StepBatches(self), batch_size=None,
                                                 sampler=_CountFrom(self.step),
                                                 num_workers=self.num_workers))
            batch = next(self._prefetch)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop the DataLoader worker processes, if any (they restart on the next batch)."""
        self._prefetch = None

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.step * self.micro_batch_size * self.dp_world,
                "seed": self.seed, "sources": [s.fingerprint() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["consumed_samples"]`` samples of the global stream.  The data
        and seed must be those of the saved run; micro-batch size and data-parallel size may
        differ if their product divides the samples consumed."""
        mine = [s.fingerprint() for s in self.sources]
        if state.get("sources") != mine or state.get("seed") != self.seed:
            raise DataError(f"loader state is for sources {state.get('sources')} with seed "
                            f"{state.get('seed')}, but data.sources "
                            f"{[s.name for s in self.sources]} are {mine} with seed {self.seed}; "
                            f"resuming would not continue the same sample stream")
        per_step = self.micro_batch_size * self.dp_world
        consumed = int(state["consumed_samples"])
        if consumed % per_step:
            raise DataError(f"loader state consumed {consumed} samples, not a multiple of "
                            f"micro_batch_size x dp_world = {per_step}")
        self.step = consumed // per_step
        self._prefetch = None


class ValLoader:
    """The validation split for one data-parallel rank: the same ``len(self)`` batches on every
    rank (rank ``r`` reads samples ``r, r + W, ...``, wrapping around), the same on every pass."""

    def __init__(self, reader: StreamingDataset, num_samples: int, *, micro_batch_size: int,
                 dp_rank: int, dp_world: int) -> None:
        _check_layout(micro_batch_size, dp_rank, dp_world)
        self.reader, self.num_samples = reader, num_samples
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        per_rank = -(-num_samples // dp_world)
        self.num_batches = -(-per_rank // micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        B, W = self.micro_batch_size, self.dp_world
        for step in range(self.num_batches):
            positions = (step * B + np.arange(B, dtype=np.int64)) * W + self.dp_rank
            yield _read_rows(self.reader, positions % self.num_samples)


def build_train_loader(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_world: int,
                       vocab_size: int) -> TrainLoader:
    """The training stream of ``cfg.sources`` (packed at ``cfg.seq_len``, shuffled by
    ``cfg.shuffle_seed``) for data-parallel rank ``dp_rank`` of ``dp_world``.  Collective when
    torch.distributed is initialized: every rank calls it, in the same order as other loaders."""
    sources = _open_sources(cfg, vocab_size)
    reader = _open_reader(sources, "train", cfg)
    return TrainLoader(reader, sources, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                       dp_world=dp_world, seed=cfg.shuffle_seed, num_workers=cfg.num_workers)


def build_val_loader(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_world: int,
                     vocab_size: int) -> ValLoader:
    """The val split of ``cfg.val_path`` (default: the first source) for one data-parallel rank.
    Collective when torch.distributed is initialized, like :func:`build_train_loader`."""
    source = _open_source(cfg.val_path or cfg.sources[0].path, 1.0, cfg, vocab_size)
    reader = _open_reader([source], "val", cfg)
    return ValLoader(reader, source.manifest.splits["val"].sequences,
                     micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_world=dp_world)

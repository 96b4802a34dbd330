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
samples consumed by all ranks together.  The datasets are found and checked by :mod:`.sources`;
blending and shuffling are :mod:`.order`; this module reads the samples and makes the loaders.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader, Dataset, Sampler

from mythos_scale.config import DataConfig
from mythos_scale.data.manifest import IGNORE_INDEX, MASK_COLUMN, DataError
from mythos_scale.data.order import SampleOrder
from mythos_scale.data.sources import Source, node_layout, open_source, open_sources, verify_split

log = logging.getLogger(__name__)

_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


# --------------------------------------------------------------------------- streaming


@contextmanager
def _streaming_world() -> Iterator[None]:
    """Describe this process to StreamingDataset, which reads the process layout from env vars.

    It uses the layout only to share per-node state (shared memory named by a prefix registered
    by the node's local leader, with ``torch.distributed`` barriers around it when initialized);
    the order of samples is ours.  So: with torch.distributed up, give it the true layout (every
    rank must then build the dataset, in the same order); without, this process is on its own.
    """
    values = node_layout()
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


def open_reader(sources: list[Source], split: str, cfg: DataConfig) -> StreamingDataset:
    """One reader over ``split`` of ``sources`` (local shards verified first), its sample counts
    checked against the manifests.  Collective when torch.distributed is initialized."""
    for source in sources:
        if source.manifest.splits.get(split) is None:
            raise DataError(f"{source.name} has no {split} split (prepared with "
                            f"--val-fraction 0?)")
        if source.remote is None:
            verify_split(source, split, cfg.seq_len, cfg.verify_shards)
    reader = streaming_dataset([(f"{s.remote}/{split}" if s.remote else None, str(s.root / split))
                                 for s in sources])
    for source, samples in zip(sources, reader.samples_per_stream.tolist()):
        if samples != source.manifest.splits[split].sequences:
            raise DataError(f"{source.name}/{split}: the shard index lists {samples} sequences, "
                            f"its manifest {source.manifest.splits[split].sequences}")
    return reader


def streaming_dataset(remote_local: list[tuple[str | None, str]]) -> StreamingDataset:
    """A StreamingDataset over ``(remote, local)`` streams.  Independent processes may register a
    shared-memory prefix at the same instant; a process on its own can retry, a process group
    cannot (the attempt is collective).  Each attempt gets new Stream objects: a failed one leaves
    its streams with defaults applied, which the next would refuse as conflicting weights.

    Streaming keeps every shared-memory handle it opens until the process exits, and each new
    dataset opens one per live registration on the node: a process should build few datasets
    (a test suite that builds hundreds runs out of file descriptors; see ``launch/test.sh``)."""
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


def read_rows(reader: StreamingDataset,
               sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of the samples; where a sample has a ``loss_mask`` (synthetic tasks), its
    labels are IGNORE_INDEX wherever the mask is 0, so the loss counts the marked tokens only."""
    samples = [reader.get_item(int(i)) for i in sample_ids]
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    labels = tokens[:, 1:].clone()
    if any(MASK_COLUMN in s for s in samples):  # a blend may mix masked and plain sources
        keep = np.stack([s[MASK_COLUMN][1:] if MASK_COLUMN in s else np.ones(labels.shape[1], np.uint8)
                         for s in samples])
        labels[torch.from_numpy(keep == 0)] = IGNORE_INDEX
    return tokens[:, :-1].contiguous(), labels


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

    def __init__(self, reader: StreamingDataset, sources: list[Source], *, micro_batch_size: int,
                 dp_rank: int, dp_world: int, seed: int, num_workers: int = 0) -> None:
        _check_layout(micro_batch_size, dp_rank, dp_world)
        if seed < 0:
            raise DataError(f"data.shuffle_seed must be >= 0, got {seed}")
        self.reader, self.sources = reader, sources
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        self.seed, self.num_workers = seed, num_workers
        self.step = 0  # micro-batches handed out by this rank
        sizes = [s.manifest.splits["train"].sequences for s in sources]
        self.order = SampleOrder(sizes, [s.weight for s in sources], seed,
                                  [s.name for s in sources])
        self._offsets = reader.sample_offset_per_stream
        self._prefetch: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def sample_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index within it) of each row of micro-batch ``step`` of this rank."""
        j = np.arange(self.micro_batch_size, dtype=np.int64)
        return self.order((step * self.micro_batch_size + j) * self.dp_world + self.dp_rank)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, sample = self.sample_ids(step)
        return read_rows(self.reader, self._offsets[source] + sample)

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
            yield read_rows(self.reader, positions % self.num_samples)


def build_train_loader(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_world: int,
                       vocab_size: int) -> TrainLoader:
    """The training stream of ``cfg.sources`` (packed at ``cfg.seq_len``, shuffled by
    ``cfg.shuffle_seed``) for data-parallel rank ``dp_rank`` of ``dp_world``.  Collective when
    torch.distributed is initialized: every rank calls it, in the same order as other loaders."""
    sources = open_sources(cfg, vocab_size)
    reader = open_reader(sources, "train", cfg)
    return TrainLoader(reader, sources, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                       dp_world=dp_world, seed=cfg.shuffle_seed, num_workers=cfg.num_workers)


def build_val_loader(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_world: int,
                     vocab_size: int) -> ValLoader:
    """The val split of ``cfg.val_path`` (default: the first source) for one data-parallel rank.
    Collective when torch.distributed is initialized, like :func:`build_train_loader`."""
    source = open_source(cfg.val_path or cfg.sources[0].path, 1.0, cfg, vocab_size)
    reader = open_reader([source], "val", cfg)
    return ValLoader(reader, source.manifest.splits["val"].sequences,
                     micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_world=dp_world)

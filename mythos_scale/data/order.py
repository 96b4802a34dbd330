"""The global sample stream: position ``k`` of the stream -> (source, sample), a pure function
of ``(seed, k)`` (see :mod:`.loader` for how the positions are blended, shuffled and sharded).
O(1) memory and random access: a resume, into any data-parallel size, is a position."""


from __future__ import annotations

import numpy as np

from mythos_scale.data.manifest import DataError

BLEND_BLOCK = 4096


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


class SampleOrder:
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

"""Inference KV cache.

One :class:`LayerCache` per attention call site: ``("prelude", i)``, ``("core", t, i)`` for loop
iteration ``t`` and core layer ``i``, ``("coda", i)``.  An MLA layer stores only the normalized
latent ``c_KV`` (kv_lora_rank) and the shared, already rotated ``k_rope`` (qk_rope_head_dim) per
token; a GQA layer stores rotated keys and values.  Buffers are allocated on first write with
room for ``max_len`` tokens.

A cache is tied to one loop count: every call that uses it must run the same ``n_loops``,
because iteration ``t`` of a new token attends to iteration ``t`` of the earlier ones.
"""

from __future__ import annotations

import torch


class LayerCache:
    """Fixed-capacity buffers for one attention call site, written at ``start_pos``."""

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.buffers: list[torch.Tensor] = []

    def update(self, start_pos: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Write ``new`` (each (B, S, ...)) at ``start_pos``; return each buffer up to ``start_pos + S``."""
        seq = new[0].shape[1]
        end = start_pos + seq
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; writing up to position {end}")
        if not self.buffers:
            self.buffers = [t.new_zeros(self.batch_size, self.max_len, *t.shape[2:]) for t in new]
        out = []
        for buf, t in zip(self.buffers, new):
            buf[:, start_pos:end] = t
            out.append(buf[:, :end])
        return out

    def elements_per_token(self) -> int:
        return sum(buf[0, 0].numel() for buf in self.buffers)


class KVCache:
    """All attention caches of one generation.  ``absorb`` selects MLA weight absorption on decode."""

    def __init__(self, batch_size: int, max_len: int, absorb: bool = True) -> None:
        self.batch_size, self.max_len, self.absorb = batch_size, max_len, absorb
        self.n_loops: int | None = None
        self.layers: dict[tuple, LayerCache] = {}

    def layer(self, key: tuple) -> LayerCache:
        if key not in self.layers:
            self.layers[key] = LayerCache(self.batch_size, self.max_len)
        return self.layers[key]

    def bind_loops(self, n_loops: int) -> None:
        if self.n_loops is None:
            self.n_loops = n_loops
        elif self.n_loops != n_loops:
            raise ValueError(f"this KV cache was filled with n_loops={self.n_loops}; got n_loops={n_loops}")

    def elements_per_token(self) -> int:
        """Cached elements per token over all layers and loop iterations."""
        return sum(layer.elements_per_token() for layer in self.layers.values())

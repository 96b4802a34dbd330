"""Inference KV cache.

One :class:`LayerCache` per attention call site: ``("prelude", i)``, ``("core", t, i)`` for loop
iteration ``t`` and core layer ``i``, ``("coda", i)``.  An MLA layer stores only the normalized
latent ``c_KV`` (kv_lora_rank) and the shared, already rotated ``k_rope`` (qk_rope_head_dim) per
token; a GQA layer stores rotated keys and values.  Buffers are allocated on first write with
room for ``max_len`` tokens.

A cache is tied to one loop count: every call that uses it must run the same ``n_loops``,
because iteration ``t`` of a new token attends to iteration ``t`` of the earlier ones.  With
early exit a token that stopped after iteration ``n`` gets the entries of iteration ``n`` copied
into the later iterations' slots, so later tokens find what they attend to (see
:class:`~mythos_scale.model.recurrence.FrozenKV`).
"""

from __future__ import annotations

import torch


class LayerCache:
    """Fixed-capacity buffers for one attention call site, written at ``start_pos``."""

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.buffers: list[torch.Tensor] = []

    def write(self, start_pos: int, *new: torch.Tensor, rows: torch.Tensor | None = None) -> int:
        """Write ``new`` (each (B, S, ...), or (len(rows), S, ...) for the batch ``rows``) at
        ``start_pos``; returns the end position."""
        seq = new[0].shape[1]
        end = start_pos + seq
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; writing up to position {end}")
        if not self.buffers:
            self.buffers = [t.new_zeros(self.batch_size, self.max_len, *t.shape[2:]) for t in new]
        for buf, t in zip(self.buffers, new):
            if rows is None:
                buf[:, start_pos:end] = t
            else:
                buf[rows, start_pos:end] = t
        return end

    def update(self, start_pos: int, *new: torch.Tensor, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """:meth:`write`, then return each buffer (of those ``rows``) up to ``start_pos + S``."""
        end = self.write(start_pos, *new, rows=rows)
        return [buf[:, :end] if rows is None else buf[rows, :end] for buf in self.buffers]

    def select(self, rows: torch.Tensor | None) -> LayerCache | RowsOfLayerCache:
        """This cache as seen by a forward over the batch ``rows`` only (all rows when None)."""
        return self if rows is None else RowsOfLayerCache(self, rows)

    def elements_per_token(self) -> int:
        return sum(buf[0, 0].numel() for buf in self.buffers)


class RowsOfLayerCache:
    """A :class:`LayerCache` restricted to some batch rows (early-exit decoding skips the rest)."""

    def __init__(self, layer: LayerCache, rows: torch.Tensor) -> None:
        self.layer, self.rows = layer, rows

    def update(self, start_pos: int, *new: torch.Tensor) -> list[torch.Tensor]:
        return self.layer.update(start_pos, *new, rows=self.rows)


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

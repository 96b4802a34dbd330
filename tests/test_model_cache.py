"""Inference KV cache: MLA stores only c_KV + the shared rope key; incremental decoding (with and
without weight absorption, GQA too) reproduces the full forward."""

from __future__ import annotations

import pytest
import torch
from test_model import small_cfg, tokens

from mythos_scale.model import build_model

torch.set_num_threads(2)


def decode_incrementally(model, ids: torch.Tensor, n_loops: int, absorb: bool, prefill: int) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], absorb=absorb)
    pieces = [model(ids[:, :prefill], n_loops, cache=cache).logits]
    pos = prefill
    chunk_sizes = [3] + [1] * (ids.shape[1] - prefill - 3)  # a multi-token chunk, then single tokens
    for size in chunk_sizes:
        pieces.append(model(ids[:, pos:pos + size], n_loops, cache=cache, start_pos=pos).logits)
        pos += size
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("absorb", [True, False])
@pytest.mark.parametrize("variant", [
    {},
    {"attention": {"q_lora_rank": 8}, "lora_targets": ["q", "kv", "o", "router"]},
    {"act": {"enabled": True, "halt_bias_init": 0.0}, "sandwich_norm": True},
    {"n_heads": 4, "attention": {"type": "gqa", "n_kv_heads": 2}},
])
def test_incremental_decode_matches_full_forward(variant, absorb):
    cfg = small_cfg(**variant)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):  # make the per-iteration adapters matter
                p.normal_(0, 0.05)
        ids = tokens(cfg, batch=2, seq=14)
        full = model(ids, n_loops=3).logits
        incremental = decode_incrementally(model, ids, 3, absorb, prefill=6)
    assert torch.allclose(incremental, full, atol=1e-5), (incremental - full).abs().max()


def test_mla_cache_holds_latent_and_rope_key_only():
    cfg = small_cfg()
    model = build_model(cfg, seed=0).eval()
    loops = 3
    cache = model.new_cache(2)
    with torch.no_grad():
        model(tokens(cfg, seq=5), loops, cache=cache)
    a = cfg.attention
    per_layer = a.kv_lora_rank + a.qk_rope_head_dim
    core_keys = {("core", t, i) for t in range(loops) for i in range(cfg.core_layers)}
    assert core_keys <= cache.layers.keys()
    assert len(cache.layers) == cfg.prelude_layers + cfg.coda_layers + cfg.core_layers * loops
    for key, layer in cache.layers.items():
        assert layer.elements_per_token() == per_layer, key
        assert [tuple(b.shape) for b in layer.buffers] == [(2, cfg.max_seq_len, a.kv_lora_rank),
                                                          (2, cfg.max_seq_len, a.qk_rope_head_dim)]
    assert cache.elements_per_token() == len(cache.layers) * per_layer


def test_cache_rejects_a_different_loop_count_and_overflow():
    cfg = small_cfg()
    model = build_model(cfg, seed=0).eval()
    cache = model.new_cache(1, max_len=8)
    ids = tokens(cfg, batch=1, seq=8)
    with torch.no_grad():
        model(ids[:, :6], 2, cache=cache)
        with pytest.raises(ValueError, match="n_loops=2"):
            model(ids[:, 6:7], 3, cache=cache, start_pos=6)
        with pytest.raises(ValueError, match="holds 8 tokens"):
            model(ids[:, :3], 2, cache=cache, start_pos=6)

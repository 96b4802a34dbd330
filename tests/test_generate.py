"""Sampling with the compressed KV cache (mythos_scale.eval.generate): greedy decoding through the
cache equals greedy decoding by full forward passes, token for token; EOS, sampling filters,
cache size and bad arguments."""

from __future__ import annotations

import pytest
import torch
from test_model import small_cfg, tokens

from mythos_scale.eval.generate import Sampling, generate, next_token
from mythos_scale.model import build_model

torch.set_num_threads(2)


def trained_looking(cfg):
    """A model whose per-iteration adapters matter (LoRA B is zero at init)."""
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    return model


ACT = {"act": {"enabled": True, "halt_bias_init": 0.0}}


@pytest.mark.parametrize("variant, n_loops, absorb", [({}, 1, True), ({}, 3, True), ({}, 3, False), ({}, 6, True),
                                                      (ACT, 3, True), (ACT, 3, False)],
                         ids=["T1", "T3", "T3-no-absorb", "T6", "act-T3", "act-T3-no-absorb"])
def test_greedy_with_cache_equals_full_forward(variant, n_loops, absorb):
    cfg = small_cfg(**variant)
    model = trained_looking(cfg)
    prompt = tokens(cfg, batch=2, seq=5)
    greedy = Sampling(temperature=0.0)
    cached = generate(model, prompt, 12, n_loops, greedy, absorb=absorb)
    full = generate(model, prompt, 12, n_loops, greedy, use_cache=False)
    assert torch.equal(cached.tokens, full.tokens), (cached.tokens, full.tokens)
    assert cached.tokens.shape == (2, 12) and len(set(cached.tokens.flatten().tolist())) > 1
    if variant:  # ACT halts per token: fewer loops than T on average once T > 1
        assert cached.mean_loops <= n_loops
    else:
        assert cached.mean_loops == n_loops


def test_each_row_stops_at_eos():
    cfg = small_cfg()
    model = trained_looking(cfg)
    prompt = tokens(cfg, batch=2, seq=5)
    def sample(eos=None):  # the same draws each time, so the runs agree up to the EOS
        return generate(model, prompt, 8, 2, Sampling(temperature=1.0), eos_id=eos,
                        generator=torch.Generator().manual_seed(3))

    free = sample()
    row0 = free.tokens[0].tolist()
    at = next(i for i in range(1, 8) if row0[i] not in row0[:i])  # a token row 0 first reaches at step `at`
    eos = row0[at]
    stopped = sample(eos)
    assert stopped.lengths[0] == at + 1
    assert torch.equal(stopped.tokens[0, :at], free.tokens[0, :at])
    assert stopped.tokens[0, at:].eq(eos).all()  # after its EOS a row only repeats it
    row1 = free.tokens[1].tolist()
    expect1 = row1.index(eos) + 1 if eos in row1 else None
    if expect1 is None:
        assert stopped.lengths[1] == 8 and torch.equal(stopped.tokens[1], free.tokens[1])
    else:
        assert stopped.lengths[1] == expect1


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(400, 1)
    assert next_token(logits, Sampling(temperature=0.0), gen).eq(0).all()
    top2 = next_token(logits, Sampling(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}  # both drawn, nothing else
    # p = softmax: 0.56, 0.21, 0.13, ...; top_p 0.7 keeps the two most likely, 0.5 the first alone
    assert set(next_token(logits, Sampling(temperature=1.0, top_p=0.7), gen).tolist()) == {0, 1}
    assert next_token(logits, Sampling(temperature=1.0, top_p=0.5), gen).eq(0).all()
    assert len(set(next_token(logits, Sampling(temperature=1.0), gen).tolist())) == 5
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_cache_bytes_and_limits():
    cfg = small_cfg()
    model = trained_looking(cfg)
    out = generate(model, tokens(cfg, batch=1, seq=4), 6, 3, Sampling(temperature=0.0))
    a = cfg.attention
    sites = cfg.prelude_layers + cfg.coda_layers + 3 * cfg.core_layers
    assert out.cache_bytes_per_token == sites * (a.kv_lora_rank + a.qk_rope_head_dim) * 4
    assert out.uncached_bytes_per_token == sites * cfg.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim
                                                                  + a.v_head_dim) * 4
    assert out.cache_bytes == out.cache_bytes_per_token * (4 + 6)  # room for prompt + new tokens
    assert out.decode_steps == 5 and out.decode_tokens_per_s > 0
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, tokens(cfg, batch=1, seq=30), 8)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 8)


def test_kl_exit_decoding_uses_fewer_loops():
    cfg = small_cfg()
    model = trained_looking(cfg)
    prompt = tokens(cfg, batch=2, seq=5)
    everything = generate(model, prompt, 10, 4, Sampling(temperature=0.0), exit_threshold=0.0)
    all_loops = generate(model, prompt, 10, 4, Sampling(temperature=0.0))
    assert torch.equal(everything.tokens, all_loops.tokens) and everything.mean_loops == 4
    early = generate(model, prompt, 10, 4, Sampling(temperature=0.0), exit_threshold=10.0)
    assert early.mean_loops == 2  # the earliest a KL exit can stop: after comparing iterations 1 and 2

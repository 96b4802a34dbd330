"""Sampling from a model with its compressed KV cache.

The prompt is run once (prefill) into a :class:`~mythos_scale.model.cache.KVCache` (MLA: the
latent ``c_KV`` and the shared rope key per token and attention call site), then one token per
step through the cache with MLA's weight absorption (the query is folded into the latent space,
so no per-head key or value is ever materialized).  ``use_cache=False`` runs a full forward
over the whole sequence at every step instead: the reference the cache is tested against.

Each row stops at its end-of-document token; the loop stops once every row has.  With the KL
exit (``exit_threshold``) or an ACT model, each new token runs only the loop iterations it needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mythos_scale.model import KVCache, MythosModel


@dataclass
class Sampling:
    """``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 keep every token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, new): the sampled tokens; after a row's EOS, its EOS repeated
    lengths: list[int]  # new tokens of each row, its EOS included
    prefill_s: float
    decode_s: float  # the token-by-token forwards (every new token but the first, which prefill gives)
    decode_steps: int  # those forwards, each over one token of every row
    mean_loops: float  # loop iterations per decoded token (the prompt's not counted)
    cache_bytes: int = 0  # allocated by the KV cache (capacity: prompt + max_new_tokens)
    cache_bytes_per_token: int = 0  # cached per token, over every layer and loop iteration
    uncached_bytes_per_token: int = 0  # what per-head keys and values would take instead
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens computed per second by the token-by-token forwards (every row counted)."""
        return self.tokens.shape[0] * self.decode_steps / self.decode_s if self.decode_steps else float("nan")


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids under ``sampling``."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def uncached_bytes_per_token(model: MythosModel, cache: KVCache) -> int:
    """Bytes per token that per-head keys and values (no latent compression) would take at
    the same attention call sites."""
    cfg = model.cfg
    a = cfg.attention
    if a.type == "mla":
        per_site = cfg.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    else:
        per_site = 2 * a.n_kv_heads * (cfg.dim // cfg.n_heads)
    element = next(model.parameters()).element_size()
    return per_site * len(cache.layers) * element


@torch.no_grad()
def generate(model: MythosModel, prompt: torch.Tensor, max_new_tokens: int, n_loops: int | None = None,
             sampling: Sampling | None = None, eos_id: int | None = None, exit_threshold: float | None = None,
             absorb: bool = True, use_cache: bool = True, generator: torch.Generator | None = None) -> Generation:
    """Sample up to ``max_new_tokens`` after ``prompt`` ((B, P) token ids, rows of equal length)."""
    model.eval()
    sampling = sampling or Sampling()
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's max_seq_len ({model.cfg.max_seq_len})")
    device = next(model.parameters()).device
    ids = prompt.to(device)
    bsz = ids.shape[0]
    loops = model.default_loops if n_loops is None else n_loops
    cache = model.new_cache(bsz, max_len=total, absorb=absorb) if use_cache else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    start = time.perf_counter()
    out = model(ids, loops, cache=cache, exit_threshold=exit_threshold)
    sync()
    prefill_s = time.perf_counter() - start
    new = []
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    lengths = [max_new_tokens] * bsz
    loops_used = torch.zeros((), device=device)  # summed on the device: no host sync per token
    start = time.perf_counter()
    for i in range(max_new_tokens):
        token = next_token(out.logits[:, -1], sampling, generator)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
        new.append(token)
        if eos_id is not None:  # a host sync per token, to stop once every row has ended
            for row in (~finished & (token == eos_id)).nonzero().flatten().tolist():
                lengths[row] = i + 1
            finished |= token == eos_id
            if bool(finished.all()):
                break
        if i == max_new_tokens - 1:
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        if cache is not None:
            out = model(token[:, None], loops, cache=cache, start_pos=ids.shape[1] - 1, exit_threshold=exit_threshold)
            loops_used += out.loops_used.float().mean()
        else:
            out = model(ids, loops, exit_threshold=exit_threshold)
            loops_used += out.loops_used[:, -1].float().mean()
    sync()
    decode_s = time.perf_counter() - start
    steps = len(new) - 1
    mean_loops = loops_used.item() / steps if steps else float(loops)
    result = Generation(tokens=torch.stack(new, dim=1).cpu(), lengths=lengths, prefill_s=prefill_s,
                        decode_s=decode_s, decode_steps=steps, mean_loops=mean_loops)
    if cache is not None:
        element = next(model.parameters()).element_size()
        result.cache_bytes = sum(buf.numel() * buf.element_size() for layer in cache.layers.values()
                                 for buf in layer.buffers)
        result.cache_bytes_per_token = cache.elements_per_token() * element
        result.uncached_bytes_per_token = uncached_bytes_per_token(model, cache)
    return result

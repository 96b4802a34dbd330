"""Bytes of source text per token, for bits per byte: a loss comparable across tokenizers.

Bits per byte = (sum of the token losses in nats) / ln 2 / (UTF-8 bytes the predicted tokens
decode to).  A byte-level BPE token is a fixed byte string written in GPT-2's printable
alphabet (one character per byte), so its byte count is its length; special tokens (the
end-of-document token) stand for no text and count 0 bytes.
"""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer


def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each token id decodes to (0 for special tokens and ids the tokenizer lacks).
    ValueError for a tokenizer that is not byte-level BPE (its tokens' bytes are not fixed)."""
    kind = (json.loads(tokenizer.to_str()).get("decoder") or {}).get("type")
    if kind != "ByteLevel":
        raise ValueError(f"the tokenizer's decoder is {kind!r}, not byte-level BPE: its tokens' bytes are unknown")
    decoder = byte_level_decoder()
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in specials or idx >= vocab_size:
            continue
        if not all(c in decoder for c in token):
            raise ValueError(f"token {token!r} is not byte-level BPE: cannot count its bytes")
        lengths[idx] = len(token)
    return lengths

"""Tokenizers: a byte-level BPE trained here, or any local ``tokenizer.json`` / HF tokenizer folder.

Nothing is ever downloaded.  Every tokenizer used to prepare data needs an end-of-document token,
found among the usual names (or the ``eos_token`` of a HF folder's tokenizer_config.json) or
named explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mythos_scale.data.manifest import DataError

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
MIN_VOCAB_SIZE = 256 + 1  # every byte plus the EOS token


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    path: Path  # the tokenizer.json file
    eos_id: int
    vocab_size: int
    sha256: str


def train_bpe(documents: Iterable[str], vocab_size: int, out: str | Path) -> Path:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, EOS ``<|endoftext|>``) and save it."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at "
                        f"least {MIN_VOCAB_SIZE} (256 bytes + EOS)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    count = 0

    def counted() -> Iterable[str]:
        nonlocal count
        for document in documents:
            count += 1
            yield document

    tokenizer.train_from_iterator(counted(), trainer)
    if count == 0:
        raise DataError("no documents to train the tokenizer on")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    tmp.replace(out)
    return out


def _eos_from_config(folder: Path) -> str | None:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> LoadedTokenizer:
    """Load a local ``tokenizer.json`` (or a folder holding one) and find its EOS token."""
    given = Path(path).expanduser()
    if not given.exists():
        raise DataError(f"tokenizer not found: {path}")
    file = given / "tokenizer.json" if given.is_dir() else given
    if not file.is_file():
        raise DataError(f"tokenizer folder {path} has no tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{file}: not a valid tokenizer file ({exc})") from None
    candidates = [eos_token] if eos_token else [
        c for c in ((_eos_from_config(given) if given.is_dir() else None), *EOS_CANDIDATES) if c]
    eos_id = next((i for i in map(tokenizer.token_to_id, candidates) if i is not None), None)
    if eos_id is None:
        raise DataError(f"{file}: no end-of-document token (looked for {candidates}); "
                        f"name it with --eos-token")
    # Ids need not be contiguous: the embedding must cover the largest one.
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    return LoadedTokenizer(tokenizer=tokenizer, path=file, eos_id=eos_id, vocab_size=vocab_size,
                           sha256=file_sha256(file))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Tokenizer worker processes (``prepare --workers N``), each with its own single-threaded copy.

_worker_tokenizer: Tokenizer | None = None


def init_encode_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _worker_tokenizer = Tokenizer.from_file(tokenizer_file)


def encode_documents(documents: list[str]) -> list[np.ndarray]:
    """Token ids of each document in the worker's tokenizer."""
    assert _worker_tokenizer is not None, "init_encode_worker was not called"
    return encode_with(_worker_tokenizer, documents)


def encode_with(tokenizer: Tokenizer, documents: list[str]) -> list[np.ndarray]:
    """Token ids (uint32) of each document, without the tokenizer's own BOS/EOS templates."""
    encodings = tokenizer.encode_batch(documents, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

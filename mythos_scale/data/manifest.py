"""The manifest of a prepared dataset and the checks made before anything reads its shards.

A prepared dataset is a folder (or object-store prefix)::

    manifest.json      written last: a dataset without it is incomplete and never read
    tokenizer.json     a copy of the tokenizer that produced the tokens
    train/  val/       MDS shards (streaming's index.json + shard.*.mds), one column ``tokens``
                       holding ``seq_len + 1`` tokens per sample, and optionally ``loss_mask``
                       (uint8, ``seq_len + 1``: 0 where the label is not trained on)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "mythos-mds-v1"
SPLITS = ("train", "val")
MASK_COLUMN = "loss_mask"  # optional MDS column: 1 where the label is trained on
IGNORE_INDEX = -100  # a label the loss skips (torch's cross-entropy default): tokens outside a ``loss_mask``


class DataError(ValueError):
    """Bad input or a dataset that cannot be used; the message names the file or key."""


@dataclass
class SplitStats:
    sequences: int = 0  # samples of seq_len + 1 tokens
    documents: int = 0
    tokens: int = 0  # tokens of the split's token stream (documents + one EOS each)
    dropped_tail_tokens: int = 0  # the final partial sequence, not written


@dataclass
class Manifest:
    seq_len: int
    vocab_size: int
    eos_id: int
    dtype: str  # numpy dtype of the stored tokens
    tokenizer_sha256: str
    hashes: list[str]
    splits: dict[str, SplitStats]
    inputs: dict[str, Any] = field(default_factory=dict)
    # MDS columns beside ``tokens`` (name -> encoding), e.g. the synthetic tasks' ``loss_mask``
    extra_columns: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise DataError(f"{where}: format is {raw.get('format')!r}, expected {FORMAT!r}")
            raw["splits"] = {k: SplitStats(**v) for k, v in raw["splits"].items()}
            return cls(**raw)
        except DataError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"{where}: not a valid dataset manifest ({exc})") from None


def read_manifest(dataset_dir: str | Path) -> Manifest:
    """Read ``DIR/manifest.json``; a folder without one is not (or not yet) a prepared dataset."""
    path = Path(dataset_dir).expanduser() / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} not found: {dataset_dir} is not a prepared dataset, or its preparation did "
            f"not finish (the manifest is written last); run `mythos data prepare` again")
    return Manifest.from_json(path.read_text(), str(path))


def check_compatible(dataset_dir: str | Path, seq_len: int, vocab_size: int) -> Manifest:
    """Raise :class:`DataError` unless the dataset was packed at ``seq_len`` with a tokenizer whose
    ids all fit a model vocabulary of ``vocab_size``; return its manifest."""
    manifest = read_manifest(dataset_dir)
    if manifest.seq_len != seq_len:
        raise DataError(
            f"{dataset_dir}: shards hold sequences of seq_len {manifest.seq_len} but "
            f"data.seq_len is {seq_len}; prepare the data again with --seq-len {seq_len}")
    if manifest.vocab_size > vocab_size:
        raise DataError(
            f"{dataset_dir}: tokenizer vocabulary ({manifest.vocab_size}) is larger than "
            f"model.vocab_size ({vocab_size}); token ids would index past the embedding")
    return manifest

"""Input documents: files, folders and glob patterns of txt, jsonl and parquet.

Formats go by suffix: ``.jsonl`` (one JSON object per line, the text in ``text_field``),
``.parquet`` (one row per document, column ``text_field``), anything else is plain text, one
document per file.  Files that are binary (a NUL byte) or not UTF-8 are skipped and counted;
malformed JSON lines and missing fields are errors naming the file and line.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mythos_scale.data.manifest import DataError

_GLOB_CHARS = set("*?[")


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"


def find_input_files(inputs: list[str]) -> list[Path]:
    """Expand files, folders (recursively, hidden entries skipped) and globs, in sorted order."""
    if not inputs:
        raise DataError("no --input given")
    files: list[Path] = []
    for item in inputs:
        if _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(str(Path(item).expanduser()), recursive=True))
            if not matches:
                raise DataError(f"input pattern {item!r} matched no files")
            candidates = [Path(m) for m in matches]
        else:
            path = Path(item).expanduser()
            if not path.exists():
                raise DataError(f"input not found: {item}")
            candidates = [path]
        for path in candidates:
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file() and not any(
                    part.startswith(".") for part in p.relative_to(path).parts))
            elif path.is_file():
                files.append(path)
    if not files:
        raise DataError(f"no input files under {', '.join(inputs)}")
    return files


def _decode_text(path: Path, stats: ReadStats) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        stats.skipped.append(f"{path}: binary (contains NUL bytes)")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        stats.skipped.append(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})")
        return None


def _jsonl_documents(path: Path, text: str, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (has {keys}); "
                            f"choose the field with --text-field")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is "
                            f"{type(value).__name__}, expected a string")
        yield value


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (has {names}); "
                        f"choose the column with --text-field")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def read_documents(files: list[Path], text_field: str, stats: ReadStats) -> Iterator[str]:
    """Yield the non-empty documents of ``files`` in order, counting into ``stats``."""
    for path in files:
        stats.files += 1
        if path.suffix == ".parquet":
            documents = _parquet_documents(path, text_field)
        else:
            text = _decode_text(path, stats)
            if text is None:
                continue
            documents = (_jsonl_documents(path, text, text_field) if path.suffix == ".jsonl"
                         else [text])
        for document in documents:
            if document:
                stats.documents += 1
                yield document

"""Input documents: files, folders and glob patterns of text, JSON lines, parquet and HF datasets.

Formats go by name: ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one JSON object per line, the
text in ``text_field``; read line by line, decompressed as a stream, so dumps of any size work as
they come), ``.parquet`` (one row per document, column ``text_field``, read in row batches), a
folder written by Hugging Face ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict: its
Arrow files, in the order its ``state.json`` lists them, column ``text_field``), anything else is
plain text, one document per file.  Text files that are binary (a NUL byte) or not UTF-8 are
skipped and counted, as is the rest of a JSON-lines file from a line that is not UTF-8;
malformed JSON lines and missing fields are errors naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import io
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
                files += _folder_files(path)
            elif path.is_file():
                files.append(path)
    if not files:
        raise DataError(f"no input files under {', '.join(inputs)}")
    return files


def _hf_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder in order, or None if it is not one."""
    try:
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            return [f for split in splits for f in _hf_dataset_files(folder / split) or []]
        if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
            return [folder / d["filename"] for d in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}: looks like a Hugging Face datasets folder, but its dataset_dict.json / "
                        f"state.json cannot be read ({exc!r})") from None
    return None


def _folder_files(folder: Path) -> list[Path]:
    """A folder's files, recursively in sorted order (hidden entries skipped); a ``datasets``
    folder anywhere in it stands for its Arrow files."""
    hf = _hf_dataset_files(folder)
    if hf is not None:
        return hf
    files: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files += _folder_files(entry)
        elif entry.is_file():
            files.append(entry)
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


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def _open_lines(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed as a stream for ``.gz`` / ``.zst``."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs zstandard (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _jsonl_documents(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    try:
        with _open_lines(path) as lines:
            for lineno, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    stats.skipped.append(f"{path}: not UTF-8 ({exc.reason} at line {lineno}); the rest "
                                         f"of the file is skipped")
                    return
                if not line.strip():
                    continue
                yield _jsonl_text(path, lineno, line, text_field)
    except DataError:
        raise
    except Exception as exc:  # gzip.BadGzipFile, zstandard.ZstdError, EOFError on a truncated stream
        raise DataError(f"{path}: cannot be read as {''.join(path.suffixes)} ({exc})") from None


def _jsonl_text(path: Path, lineno: int, line: str, text_field: str) -> str:
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
    return value


def _column_values(path: Path, names: list[str], batches, text_field: str) -> Iterator[str]:
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (has {names}); "
                        f"choose the column with --text-field")
    for batch in batches:
        for value in batch.column(text_field).to_pylist():
            if value is not None:
                yield value


def _arrow_documents(path: Path, text_field: str) -> Iterator[str]:
    """A ``datasets`` Arrow file (the IPC stream format), batch by batch."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable Arrow stream ({exc})") from None
    yield from _column_values(path, reader.schema.names, reader, text_field)


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
    batches = parquet.iter_batches(columns=[text_field], batch_size=1024) if text_field in names else []
    yield from _column_values(path, names, batches, text_field)


def read_documents(files: list[Path], text_field: str, stats: ReadStats) -> Iterator[str]:
    """Yield the non-empty documents of ``files`` in order, counting into ``stats``."""
    for path in files:
        stats.files += 1
        if path.suffix == ".parquet":
            documents = _parquet_documents(path, text_field)
        elif path.suffix == ".arrow":
            documents = _arrow_documents(path, text_field)
        elif path.name.endswith(JSONL_SUFFIXES):
            documents = _jsonl_documents(path, text_field, stats)
        else:
            text = _decode_text(path, stats)
            if text is None:
                continue
            documents = [text]
        for document in documents:
            if document:
                stats.documents += 1
                yield document

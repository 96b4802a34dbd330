"""Writing one rank's checkpoint file: safetensors streamed from host memory, hashed, fsynced.

A :class:`WriteJob` writes in the calling thread (:meth:`WriteJob.run`) or in a background one
(:meth:`WriteJob.start`) while training goes on; it can be aborted between chunks (the partial
file is removed) and reports its progress, so a stop can tell how long the rest will take.
The file is durable when the job is done: the data and the folder entry are fsynced.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

# safetensors' names of the dtypes a checkpoint holds
DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
CHUNK_BYTES = 16 << 20


class WriteAborted(Exception):
    pass


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable (a new file's name, a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a few file systems refuse fsync on a folder; nothing more can be done
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@dataclass
class FileReport:
    """What a rank wrote, as its commit record lists it."""

    name: str
    bytes: int
    xxh3: str
    seconds: float


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file holding ``tensors`` in order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class WriteJob:
    """Write ``tensors`` (host memory, left untouched until the job is done) and ``metadata`` to
    the safetensors file ``path``.  ``ready`` is called first, in the writing thread (it waits
    for device-to-host copies); ``limit_bytes_per_s`` caps the write rate (0: none)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                 ready: Callable[[], None] | None = None, limit_bytes_per_s: float = 0.0):
        self.path = Path(path)
        self.tensors = tensors
        self.header = safetensors_header(tensors, metadata)
        self.ready = ready
        self.limit = limit_bytes_per_s
        self.total = len(self.header) + sum(t.numel() * t.element_size() for t in tensors.values())
        self.written = 0
        self.started: float | None = None
        self.report: FileReport | None = None
        self.error: str | None = None
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WriteJob:
        self._thread = threading.Thread(target=self.run, name=f"checkpoint-writer {self.path.name}", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        self.started = time.perf_counter()
        try:
            if self.ready is not None:
                self.ready()
            self.report = self._write()
        except WriteAborted:
            self.path.unlink(missing_ok=True)
        except Exception as exc:  # disk full, permissions, a vanished folder: reported at the commit
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.tensors = {}  # the host buffers may be reused once the job is done

    def _chunks(self) -> Iterator[memoryview]:
        size = CHUNK_BYTES if not self.limit else int(min(CHUNK_BYTES, max(1 << 12, self.limit / 20)))
        yield memoryview(self.header)
        for tensor in self.tensors.values():
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            for at in range(0, len(data), size):
                yield data[at:at + size]

    def _write(self) -> FileReport:
        hasher = xxhash.xxh3_64()
        with open(self.path, "wb", buffering=0) as f:
            for chunk in self._chunks():
                if self._abort.is_set():
                    raise WriteAborted
                while chunk:
                    n = f.write(chunk)
                    hasher.update(chunk[:n])
                    chunk = chunk[n:]
                    self.written += n
                if self.limit:
                    ahead = self.written / self.limit - (time.perf_counter() - self.started)
                    if ahead > 0:
                        self._abort.wait(ahead)
            os.fsync(f.fileno())
        fsync_dir(self.path.parent)
        return FileReport(self.path.name, self.written, hasher.hexdigest(), time.perf_counter() - self.started)

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def abort(self) -> None:
        """Stop writing and remove the partial file (a finished file is left as it is)."""
        self._abort.set()
        self.wait()

    def remaining_s(self) -> float | None:
        """Seconds the rest should take at the rate so far; None before anything was written."""
        if self.done():
            return 0.0
        if not self.written or self.started is None:
            return None
        rate = self.written / max(time.perf_counter() - self.started, 1e-9)
        return (self.total - self.written) / rate

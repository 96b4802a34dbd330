"""The dependency versions mythos_scale is tested with, and the start-up check against them.

One table, read by setup.py (its pins) and by ``mythos train`` at start (exit 2 when an
installed version is outside its range, unless ``MYTHOS_ALLOW_UNTESTED_VERSIONS=1``, which turns
the error into a warning).  Imports nothing heavy: the check runs before torch loads.
"""

from __future__ import annotations

import importlib.metadata
import re

ALLOW_UNTESTED_ENV = "MYTHOS_ALLOW_UNTESTED_VERSIONS"

# package -> (lowest tested, first untested, why it is pinned)
TESTED: dict[str, tuple[str, str, str]] = {
    "torch": ("2.14", "2.15", "F.grouped_mm (the MoE GEMM) and the dispatcher behaviour the fake-CUDA tests rely on"),
    "deepspeed": ("0.19.8", "0.20", "private internals: ZeRO-1/2 _hp_mapping and fp32 partitions (checkpoints), "
                  "its MoE group registry (EP), the bf16 cast and optimizer choice (precision policy)"),
    "megatron-core": ("0.16", "0.17", "parallel_state's group layout, checked equal to DeepSpeed's EP groups"),
    "mosaicml-streaming": ("0.13", "0.14", "MDS shard format and StreamingDataset resume state"),
}


def requirement(package: str) -> str:
    low, high, _ = TESTED[package]
    return f"{package}>={low},<{high}"


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``2.14.1+cu130`` -> (2, 14, 1)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def untested_versions(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per pinned package whose installed version (or absence) is outside its tested range."""
    problems = []
    for package, (low, high, why) in TESTED.items():
        if installed is not None:
            version = installed.get(package)
        else:
            try:
                version = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                version = None
        if version is None:
            problems.append(f"{package} is not installed (tested: >={low},<{high})")
        elif not _release(low) <= _release(version) < _release(high):
            problems.append(f"{package} {version} is installed, tested: >={low},<{high} ({why})")
    return problems

"""Sources and flags of the ``mythos`` kernel extension, and a just-in-time build of it.

``setup.py`` loads this file by path (it must not import the package, nor torch at import time)
to build ``mythos_scale._C``; tests and benchmarks without an installed build call
:func:`load_extension`, which compiles the CPU kernels once into a cache folder and loads them.
"""

from __future__ import annotations

import os
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]  # the last lets FP selects vectorize
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200; extend with TORCH_CUDA_ARCH_LIST


def sources(cuda: bool) -> list[str]:
    """The C++ (and with ``cuda`` the CUDA) sources, relative to the repository root."""
    root = CSRC.parent
    files = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if cuda:
        files += sorted((CSRC / "cuda").glob("*.cu"))
    return [str(f.relative_to(root)) for f in files]


def include_dirs() -> list[str]:
    return [str(CSRC)]


def default_build_dir(cuda: bool) -> Path:
    """$MYTHOS_KERNEL_CACHE (default ~/.cache/mythos_scale)/torch-<version>/<cpu|cuda>."""
    import torch

    root = Path(os.environ.get("MYTHOS_KERNEL_CACHE", Path.home() / ".cache" / "mythos_scale"))
    return root / f"torch-{torch.__version__}" / ("cuda" if cuda else "cpu")


def load_extension(build_dir: str | os.PathLike[str] | None = None, cuda: bool = False,
                   verbose: bool = False) -> None:
    """Compile (only if the sources changed) and load the extension, registering ``torch.ops.mythos``."""
    from torch.utils import cpp_extension

    if not CSRC.is_dir():
        raise FileNotFoundError(f"kernel sources not found at {CSRC} (a source checkout is needed to build them)")
    build_dir = Path(build_dir) if build_dir is not None else default_build_dir(cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
    cpp_extension.load(
        name="mythos_C_cuda" if cuda else "mythos_C",
        sources=[str(CSRC.parent / s) for s in sources(cuda)],
        extra_include_paths=include_dirs(),
        extra_cflags=CPU_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(build_dir),
        with_cuda=cuda,
        is_python_module=False,
        verbose=verbose,
    )

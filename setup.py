"""mythos_scale: distributed pretraining of Recurrent-Depth Transformers.

``pip install -e ".[dev]"`` installs the package, the ``mythos`` command and the test tools.
"""

import importlib.util
import os
import re
import subprocess
from pathlib import Path

from setuptools import find_packages, setup


def _module(name: str):
    """A module of the package loaded from its file, without importing the package (or torch)."""
    spec = importlib.util.spec_from_file_location(f"mythos_{name.replace('/', '_')}",
                                                  Path(__file__).parent / "mythos_scale" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# torch, deepspeed, megatron-core and mosaicml-streaming are pinned to the versions tested, each with
# its reason, in mythos_scale/versions.py (`mythos train` checks them again at start).
INSTALL_REQUIRES = [
    *(_module("versions").requirement(package) for package in ("torch", "deepspeed", "megatron-core",
                                                               "mosaicml-streaming")),
    "tensorboard>=2.15",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "pyyaml>=6",
    "pydantic>=2.5",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "pyarrow>=14",
    "zstandard>=0.22",  # mythos data prepare: .jsonl.zst dumps
    "numpy>=1.24",
    "psutil>=5.9",
    "filelock>=3.12",
    "xxhash>=3.0",  # checkpoint file checksums (xxh3)
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-timeout>=2.2", "ruff>=0.5", "wandb>=0.17", "transformers>=4.45", "lm_eval>=0.4.5",
            "moto[server]>=5"],  # a local S3 endpoint for the object-store dataset tests
    "wandb": ["wandb>=0.17"],
    "hf": ["transformers>=4.45"],  # loading `mythos ckpt export --format hf` folders (the export needs none)
    "eval": ["lm_eval>=0.4.5"],  # mythos eval --tasks (lm-evaluation-harness)
    "gpu": ["flash-attn>=2.7", "liger-kernel>=0.5"],
}

# ---------------------------------------------------------------- the kernel extension (mythos_scale._C)
# MYTHOS_BUILD_EXT: unset/0 = no extension (the PyTorch reference ops are used); cpu (or 1) = the C++
# CPU kernels; cuda = CPU + CUDA kernels; auto = cuda when a GPU and a usable nvcc are present, else cpu.
# torch must be importable while building: `MYTHOS_BUILD_EXT=cpu pip install --no-build-isolation -e .`.
# An explicit cpu or cuda fails the install, saying why, when it cannot be built (cuda: no nvcc, or one
# whose major version differs from torch's CUDA); auto and a failed compile under auto only warn and
# install the package without the extension.


class KernelBuildError(RuntimeError):
    """MYTHOS_BUILD_EXT asked for something this environment cannot build."""


def _warn(message: str) -> None:
    print(f"WARNING (mythos_scale._C): {message}", flush=True)


def _kernel_build_module():
    """mythos_scale/kernels/build.py (sources and flags), loaded without importing the package."""
    return _module("kernels/build")


def _nvcc_problem(cpp_extension, torch_cuda: str | None) -> str | None:
    """Why the CUDA kernels cannot be built here, or None.  Like torch's own check, a minor
    version difference between nvcc and torch's CUDA is accepted; a major one is not."""
    if torch_cuda is None:
        return "this torch is a CPU-only build (torch.version.cuda is None)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    if cpp_extension.CUDA_HOME is None or not os.path.isfile(nvcc):
        return f"no nvcc found (CUDA_HOME={cpp_extension.CUDA_HOME}); set CUDA_HOME to a CUDA {torch_cuda} toolkit"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return f"{nvcc} --version failed: {err}"
    release = re.search(r"release (\d+)\.(\d+)", out)
    if release is None:
        return f"cannot read the version from `{nvcc} --version`"
    if release.group(1) != torch_cuda.split(".")[0]:
        return (f"{nvcc} is CUDA {release.group(1)}.{release.group(2)} but torch was built with CUDA "
                f"{torch_cuda}; point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit")
    return None


def _kernel_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when not asked for (or, under auto, not possible)."""
    mode = os.environ.get("MYTHOS_BUILD_EXT", "0").strip().lower()
    if mode in ("", "0", "no", "off"):
        print("mythos_scale._C: not built (set MYTHOS_BUILD_EXT=cpu|cuda|auto to build the fused kernels)")
        return [], {}
    if mode not in ("1", "cpu", "cuda", "auto"):
        raise KernelBuildError(f"MYTHOS_BUILD_EXT={mode!r} is not one of 0, cpu, cuda, auto")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        message = ("torch is not importable in the build environment (pip build isolation?); "
                   "use `pip install --no-build-isolation -e .`")
        if mode == "auto":
            _warn(message + "; not building the extension")
            return [], {}
        raise KernelBuildError(f"MYTHOS_BUILD_EXT={mode}: {message}") from None
    problem = _nvcc_problem(cpp_extension, torch.version.cuda) if mode in ("cuda", "auto") else None
    if mode == "cuda" and problem:
        raise KernelBuildError(f"MYTHOS_BUILD_EXT=cuda cannot build the CUDA kernels: {problem}")
    cuda = mode == "cuda" or mode == "auto" and problem is None and torch.cuda.is_available()
    kernel_build = _kernel_build_module()
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", kernel_build.CUDA_ARCHS)
    extension_class = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    extension = extension_class(
        name="mythos_scale._C",
        sources=kernel_build.sources(cuda),
        include_dirs=kernel_build.include_dirs(),
        extra_compile_args={"cxx": kernel_build.CPU_FLAGS, "nvcc": kernel_build.NVCC_FLAGS},
    )

    class KernelBuildExtension(cpp_extension.BuildExtension):
        """Builds the kernels; under auto a failure only warns (the reference ops work without them)."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # noqa: BLE001  (any compiler or toolchain failure)
                if mode != "auto":
                    raise KernelBuildError(f"MYTHOS_BUILD_EXT={mode}: building the kernels failed: {err}") from err
                _warn(f"building the kernel extension failed ({err}); installing without it")

    print(f"mythos_scale._C: building the {'CPU + CUDA' if cuda else 'CPU'} kernels")
    return [extension], {"build_ext": KernelBuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _kernel_extension()

setup(
    name="mythos_scale",
    version="0.1.0",
    description="Distributed pretraining of Recurrent-Depth Transformers (prelude / looped core / coda)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mythos_scale", "mythos_scale.*"]),
    package_data={"mythos_scale.eval": ["hf_remote/*.py"]},  # the HF export's remote-code templates
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mythos=mythos_scale.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)

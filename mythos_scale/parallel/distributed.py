"""The parallel layout: one object that says which rank does what.

world = DP x TP, and expert parallelism is carved out of DP (DeepSpeed's and Megatron's layout):

    rank    = tp_rank + TP * dp_rank          ranks of one TP group are consecutive
    dp_rank = ep_rank + EP * edp_rank         an EP group is EP consecutive data-parallel ranks

so an expert is held by the DP / EP ranks of its expert-data-parallel (EDP) group, and its
gradient is reduced over that group only.  The process groups are built by
``megatron.core.parallel_state`` (the properties below read them).  :func:`check_layout`
refuses a layout that does not fit the world (``mythos train --nproc`` checks it before starting
any rank); what tp and ep require of the model is checked by the config schema.

Launch environments understood: the DeepSpeed launcher and torchrun (RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT), Slurm's srun (SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID, MASTER_ADDR and MASTER_PORT exported by the batch script), and a bare
``python`` / ``mythos train`` process, which becomes a world of one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mythos_scale.config import layout_problem


class LaunchError(RuntimeError):
    """The launch environment is inconsistent; the message names the variable."""


class LayoutError(LaunchError):
    """``parallel.tp`` / ``parallel.ep`` do not fit the world size; the message names the numbers."""


def check_layout(world_size: int, tp: int, ep: int) -> None:
    """Refuse a world that ``tp`` and ``ep`` do not divide as world = DP x TP, DP = EP x EDP."""
    problem = layout_problem(world_size, tp, ep)
    if problem:
        raise LayoutError(problem)


# NCCL settings applied unless the launch environment sets them: a failed or timed-out collective
# ends the process (srun then ends the job) instead of hanging, and the flight recorder keeps each
# rank's last collectives and dumps them on a timeout (to TORCH_FR_DUMP_TEMP_FILE<rank>).
NCCL_ENV_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    ep: int
    device: torch.device

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        # Ranks of one tensor-parallel group are consecutive and share a data-parallel rank.
        return self.rank // self.tp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: how many ranks hold each expert (per TP rank)."""
        return self.dp // self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        """The process group's backend per device type (torchtitan's choice): on GPU, NCCL for
        CUDA tensors and gloo for CPU ones, so a collective on a CPU tensor works instead of
        failing with "No backend type associated with device type cpu".  On CPU, gloo for both
        (what plain "gloo" means), spelled the same way so CPU runs exercise the form."""
        return f"cpu:gloo,cuda:{'nccl' if self.device.type == 'cuda' else 'gloo'}"

    # The process groups: megatron-core's (init_process_groups) when the layout has TP or EP; a pure
    # data-parallel layout uses the world group and does not load megatron-core (seconds per rank).

    @property
    def has_model_parallelism(self) -> bool:
        return self.tp > 1 or self.ep > 1

    @staticmethod
    def _megatron_group(getter: str) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return getattr(parallel_state, getter)()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self._megatron_group("get_tensor_model_parallel_group")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        if not self.has_model_parallelism:
            return dist.group.WORLD
        return self._megatron_group("get_data_parallel_group")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self._megatron_group("get_expert_model_parallel_group")

    @property
    def edp_group(self) -> dist.ProcessGroup:
        if not self.has_model_parallelism:
            return dist.group.WORLD
        return self._megatron_group("get_expert_data_parallel_group")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env_from_launcher() -> None:
    """Normalise the launch environment to RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*."""
    if os.environ.get("RANK") is None and os.environ.get("SLURM_PROCID") is not None:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if os.environ.get("RANK") is None:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def cuda_device(local_rank: int) -> torch.device:
    """GPU ``LOCAL_RANK`` of the visible ones, as DeepSpeed's engine binds it (every launcher
    here starts one process per GPU with all of the node's GPUs visible)."""
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise LaunchError(
            f"LOCAL_RANK={local_rank} but this process sees {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): start at most one "
            f"process per visible GPU, each seeing all of the node's GPUs (srun without --gpus-per-task "
            f"or --gpu-bind, as slurm/pretrain_770m.sh does)")
    return torch.device("cuda", local_rank)


# The NVIDIA kernel driver creates these when the node has a GPU.
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/proc/driver/nvidia/gpus")


def allocated_gpus() -> str | None:
    """What says this node has GPUs for this process (Slurm's allocation, or NVIDIA devices the
    kernel driver shows), or None.  CUDA_VISIBLE_DEVICES is no evidence: DeepSpeed's launcher
    sets it on CPU machines too."""
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):  # GPU indices
        if os.environ.get(name, "").strip():
            return f"{name}={os.environ[name]}"
    if os.environ.get("SLURM_GPUS_ON_NODE", "").strip() not in ("", "0"):  # a count
        return f"SLURM_GPUS_ON_NODE={os.environ['SLURM_GPUS_ON_NODE']}"
    for device in NVIDIA_DEVICE_FILES:
        if Path(device).exists():
            return f"{device} exists"
    return None


def _why_cuda_is_unusable() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # the driver's own words: "driver too old", "no CUDA GPUs", ...
        return f"torch {torch.__version__} built for CUDA {torch.version.cuda} cannot use the GPU: {exc}"
    return f"torch {torch.__version__} built for CUDA {torch.version.cuda} sees no usable GPU"


def select_device(requested: str, local_rank: int) -> torch.device:
    """The rank's device for ``parallel.device``: ``cpu`` on purpose, ``cuda`` required, or
    ``auto``: the GPU when CUDA works, the CPU when no GPU was allocated, and an error when GPUs
    were allocated but CUDA cannot use them (a wheel built for a newer driver than the node's):
    training on the CPU there would waste the allocation silently."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return cuda_device(local_rank)
    allocated = allocated_gpus()
    if requested == "cuda" or allocated:
        given = f"GPUs were allocated ({allocated}) but " if allocated else "parallel.device=cuda but "
        raise LaunchError(f"{given}{_why_cuda_is_unusable()}. Install a torch wheel for the node's driver "
                          f"(nvidia-smi shows the driver's CUDA version), or set parallel.device=cpu to train "
                          f"on the CPU on purpose")
    return torch.device("cpu")


def init_distributed(tp: int = 1, ep: int = 1, timeout_minutes: float = 20.0, device: str = "auto") -> ParallelLayout:
    """Start torch.distributed (with :attr:`ParallelLayout.backend`) and return the layout.
    A collective that waits more than ``timeout_minutes`` fails instead of hanging the job;
    ``device`` is ``parallel.device`` (:func:`select_device`)."""
    _fill_env_from_launcher()
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world is None or world < 1:
        raise LaunchError("WORLD_SIZE is missing or < 1 while RANK is set")
    if rank is None or not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    local = 0 if local is None else local
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LaunchError(f"{name} is not set; multi-process launches need it "
                              f"(the Slurm scripts export it from the first node)")
    check_layout(world, tp, ep)
    device = select_device(device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        for name, value in NCCL_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
    else:
        # Ranks on one machine share its cores: oversubscribed threads make every rank slower.
        local_world = _env_int("LOCAL_WORLD_SIZE") or world
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    layout = ParallelLayout(rank=rank, world_size=world, local_rank=local, tp=tp, ep=ep, device=device)
    if not dist.is_initialized():
        import deepspeed  # deferred: importing DeepSpeed costs seconds

        try:
            deepspeed.init_distributed(dist_backend=layout.backend, auto_mpi_discovery=False,
                                       verbose=False, timeout=timedelta(minutes=timeout_minutes),
                                       rank=rank, world_size=world)
        except dist.DistNetworkError as exc:
            if "EADDRINUSE" not in str(exc):
                raise
            port = os.environ["MASTER_PORT"]
            raise LaunchError(
                f"MASTER_PORT={port} on {os.environ['MASTER_ADDR']} is already in use (another run "
                f"or program holds it): choose a free port, e.g. MASTER_PORT={int(port) + 1}, or "
                f"--master_port with the deepspeed launcher") from None
    if layout.has_model_parallelism:
        init_process_groups(layout, timeout_minutes)
    return layout


def init_process_groups(layout: ParallelLayout, timeout_minutes: float = 20.0) -> None:
    """Build the TP, DP, EP and EDP groups with megatron-core's ``parallel_state`` (on CPU/gloo
    too; its CUDA RNG seeding is not used) and check that its rank order is the layout's."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep,
        distributed_timeout_minutes=max(1, round(timeout_minutes)), create_gloo_process_groups=False)
    megatron = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
                parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_data_parallel_rank())
    ours = (layout.tp_rank, layout.dp_rank, layout.ep_rank, layout.edp_rank)
    if megatron != ours:
        raise RuntimeError(f"rank {layout.rank}: megatron-core placed it at (tp, dp, ep, edp) ranks {megatron}, "
                           f"the layout at {ours}")


def sum_over_ranks(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """Sum scalars over all ranks in one all-reduce, read back with one host sync.  The tensor is
    on ``device``, the layout's: an NCCL group has no CPU backend (the process group is
    ``cpu:gloo,cuda:nccl`` so CPU tensors work too, through gloo)."""
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])
    dist.all_reduce(packed)
    return packed.tolist()

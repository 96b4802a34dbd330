"""GPU presets and the cluster a plan runs on.

Figures are the vendors' datasheet numbers for the SXM parts in 8-GPU HGX/DGX nodes:
dense bf16 tensor-core peak (no sparsity), the memory ``nvidia-smi`` reports, HBM bandwidth,
NVLink bandwidth per GPU and direction, and the inter-node bandwidth per GPU (one 400 Gb/s
NIC per GPU on H100/H200/B200 nodes, one 200 Gb/s NIC per GPU on A100 nodes).  Every figure
can be overridden on the command line for other parts or a measured fabric.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float      # dense bf16 peak, TFLOP/s
    memory_gib: float       # device memory, GiB
    hbm_tbps: float         # device memory bandwidth, TB/s (the optimizer step is bound by it)
    nvlink_gbps: float      # intra-node bandwidth per GPU and direction, GB/s
    internode_gbps: float   # inter-node bandwidth per GPU and direction, GB/s


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("H100 SXM 80GB", 989.0, 79.6, 3.35, 450.0, 50.0),
    "h200": GPUSpec("H200 SXM 141GB", 989.0, 140.4, 4.8, 450.0, 50.0),
    "b200": GPUSpec("B200 SXM 180GB", 2250.0, 179.1, 8.0, 900.0, 50.0),
    "a100": GPUSpec("A100 SXM 80GB", 312.0, 80.0, 2.04, 300.0, 25.0),
    "a100-40gb": GPUSpec("A100 SXM 40GB", 312.0, 40.0, 1.555, 300.0, 25.0),
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GPUSpec
    compute_efficiency: float = 0.5   # fraction of the bf16 peak the matmuls reach
    comm_efficiency: float = 0.8      # fraction of the link bandwidth collectives reach
    latency_us_intra: float = 10.0    # per collective inside a node
    latency_us_inter: float = 25.0    # per collective across nodes

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"need nodes >= 1 and gpus per node >= 1, got {self.nodes} x {self.gpus_per_node}")
        for name in ("compute_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return f"{self.nodes} x {self.gpus_per_node} {self.gpu.name}"


def make_cluster(gpu: str, nodes: int, gpus_per_node: int, **overrides: float | None) -> Cluster:
    """A cluster of ``gpu`` preset nodes; ``overrides`` replace GPUSpec fields (None = keep) or
    set the Cluster efficiencies / latencies."""
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}; presets: {', '.join(GPUS)}")
    spec_fields = {k: v for k, v in overrides.items() if v is not None and hasattr(GPUS[gpu], k)}
    cluster_fields = {k: v for k, v in overrides.items() if v is not None and k not in spec_fields}
    spec = replace(GPUS[gpu], **spec_fields)
    for name in ("bf16_tflops", "memory_gib", "hbm_tbps", "nvlink_gbps", "internode_gbps"):
        if getattr(spec, name) <= 0:
            raise ValueError(f"GPU {name} must be > 0, got {getattr(spec, name)}")
    return Cluster(nodes=nodes, gpus_per_node=gpus_per_node, gpu=spec, **cluster_fields)

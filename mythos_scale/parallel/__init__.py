"""How a plain model is laid out over many processes: the layout and its process groups
(:mod:`~mythos_scale.parallel.distributed`), the partition info on parameters (:mod:`~.shard`), tensor
and expert parallelism (:mod:`~.tp`, :mod:`~.ep`), the DeepSpeed / ZeRO wrapping (:mod:`~.zero`),
and the pass applying them (:mod:`~.parallelize`).  Only the layout is imported here: the rest
loads megatron-core and DeepSpeed."""

from mythos_scale.parallel.distributed import (
                                               LaunchError,
                                               LayoutError,
                                               ParallelLayout,
                                               check_layout,
                                               init_distributed,
                                               sum_over_ranks,
)

__all__ = ["LaunchError", "LayoutError", "ParallelLayout", "check_layout", "init_distributed", "sum_over_ranks"]

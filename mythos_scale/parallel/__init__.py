"""How a plain model is laid out over many processes."""

from mythos_scale.parallel.layout import LaunchError, ParallelLayout, init_distributed

__all__ = ["LaunchError", "ParallelLayout", "init_distributed"]

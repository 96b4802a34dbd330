"""DeepSpeed's ``mpu`` (model-parallel unit) interface over megatron-core's ``parallel_state``.

DeepSpeed reads the layout through ``get_model_parallel_*``, ``get_tensor_model_parallel_*`` and
``get_data_parallel_*``; megatron-core names them differently.  Model parallel means TP here:
experts reach DeepSpeed through its MoE groups instead (:mod:`mythos_scale.parallel.zero`).
"""

from __future__ import annotations

from megatron.core import parallel_state


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's ``parallel_state`` (model parallel = TP)."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)

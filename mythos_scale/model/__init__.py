"""The Recurrent-Depth Transformer in plain PyTorch (see :mod:`mythos_scale.model.model`)."""

from mythos_scale.model.cache import KVCache
from mythos_scale.model.model import ModelOutput, MythosModel, build_model
from mythos_scale.model.moe import MoE, update_balance_bias

__all__ = ["KVCache", "ModelOutput", "MoE", "MythosModel", "build_model", "update_balance_bias"]

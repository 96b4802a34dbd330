"""Hugging Face wrapper of a mythos_scale Recurrent-Depth Transformer (remote code of an HF export).

The ``rdt_*.py`` modules next to this file are the package's own model modules, bundled at export
time with their imports made relative, so the weights run through the same code that trained them
(PyTorch reference ops; the compiled kernels are not bundled).

Loop count: ``config.n_loops`` by default, ``n_loops=`` per call (``forward`` and ``generate``);
``exit_threshold=`` turns on the per-token KL early exit.  Caching: the RDT keeps its own
:class:`MythosCache` (MLA: the latent ``c_KV`` and the shared rotated ``k_rope`` per token, per
layer and loop iteration), not a ``DynamicCache``; ``generate()`` creates it on the first step and
passes it back as ``past_key_values`` (a cache holds one loop count).  No padding: an
``attention_mask`` with zeros is refused (batch prompts of equal length, or one at a time).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers copies into its module cache only the files this one imports relatively (not
# recursively): every bundled module is named here (hf_format.write_code checks it).
from .configuration_mythos import ModelConfig, MythosConfig
from .rdt_attention import build_attention  # noqa: F401
from .rdt_cache import KVCache
from .rdt_doc_attention import DocumentLayout  # noqa: F401
from .rdt_kernels import select_kernels  # noqa: F401
from .rdt_layers import RMSNorm  # noqa: F401
from .rdt_model import MythosModel
from .rdt_moe import MoE  # noqa: F401
from .rdt_recompute import replayed_in_recompute  # noqa: F401
from .rdt_recurrence import LTIInjection  # noqa: F401


class MythosCache(KVCache):
    """The RDT's KV cache plus the number of tokens it holds (where the next call starts)."""

    def __init__(self, batch_size: int, max_len: int) -> None:
        super().__init__(batch_size, max_len)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


class MythosForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MythosConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # its own cache class: generate() must not build a DynamicCache

    def __init__(self, config: MythosConfig) -> None:
        super().__init__(config)
        self.model = MythosModel(ModelConfig(config.rdt))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, MythosModel):  # a model built from a config alone (no weights)
            module.reset_parameters()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: MythosCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, n_loops: int | None = None, exit_threshold: float | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MythosForCausalLM has no padding support: the attention_mask must be all ones")
        cache = past_key_values if isinstance(past_key_values, MythosCache) else None
        if cache is None and use_cache:
            cache = MythosCache(input_ids.shape[0], self.config.max_position_embeddings)
        start = cache.seen_tokens if cache is not None else 0
        out = self.model(input_ids, n_loops or self.config.n_loops, cache=cache, start_pos=start,
                         exit_threshold=self.config.exit_threshold if exit_threshold is None else exit_threshold)
        if cache is not None:
            cache.seen_tokens = start + input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: MythosCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      n_loops: int | None = None, exit_threshold: float | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """The tokens the cache has not seen yet (all of them on the first step, or without a cache)."""
        cache = past_key_values if use_cache and isinstance(past_key_values, MythosCache) else None
        new_ids = input_ids[:, cache.seen_tokens:] if cache is not None else input_ids
        return {"input_ids": new_ids, "past_key_values": cache, "use_cache": use_cache,
                "attention_mask": attention_mask, "n_loops": n_loops, "exit_threshold": exit_threshold}

"""Hugging Face config of a mythos_scale Recurrent-Depth Transformer (remote code of an HF export).

``config.json`` holds the RDT's own settings under ``rdt`` (the ``model`` section of the training
config, nested sections included), the default loop count ``n_loops`` and the KL early-exit
threshold ``exit_threshold`` (None: every position runs all loops).  Both can also be given per
call: ``model(ids, n_loops=8)``, ``model.generate(ids, n_loops=8)``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class ModelConfig:
    """The ``rdt`` dict as attributes (nested sections too): what the bundled model modules read."""

    def __init__(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            setattr(self, key, ModelConfig(value) if isinstance(value, dict) else value)


class MythosConfig(PretrainedConfig):
    model_type = "mythos_rdt"

    def __init__(self, rdt: dict[str, Any] | None = None, n_loops: int | None = None,
                 exit_threshold: float | None = None, **kwargs: Any) -> None:
        self.rdt = dict(rdt or {})
        self.n_loops = n_loops if n_loops is not None else max(1, self.rdt.get("max_loops", 2) // 2)
        self.exit_threshold = exit_threshold
        kwargs.setdefault("tie_word_embeddings", False)  # the RDT ties inside itself (no lm_head module)
        super().__init__(**kwargs)
        self.vocab_size = self.rdt.get("vocab_size")
        self.hidden_size = self.rdt.get("dim")
        self.max_position_embeddings = self.rdt.get("max_seq_len")

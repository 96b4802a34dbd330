"""AdamW parameter groups and the learning-rate schedule.

Weight decay applies to matrices only: norms, biases, embeddings, and the injection
parameters (A_log, dt_bias, B: they set the recurrence's stability) are excluded.
The schedule is a pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math

import torch

from mythos_scale.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    no_decay_names = model.no_weight_decay_names()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine or WSD."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    total = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / total, 1.0)
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: constant, then linear decay over the last decay_fraction
    decay_start = 1.0 - cfg.decay_fraction
    if progress <= decay_start:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * (progress - decay_start) / cfg.decay_fraction

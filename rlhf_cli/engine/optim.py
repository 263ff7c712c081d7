"""AdamW and the learning-rate schedule, computed from optimizer steps.

The schedule is a pure function of the global optimizer step, so it ends where it should
on any number of processes (a per-process micro-step count would end N times too early).
"""

from __future__ import annotations

import math

import torch

from ..schema import TrainSection


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    if train.warmup_steps:
        return train.warmup_steps
    return int(train.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for the optimizer step about to be taken."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(params, train: TrainSection, lr: float | None = None) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in params:
        if not param.requires_grad:
            continue
        # Biases and norm gains are 1-D: weight decay on them only hurts.
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=lr if lr is not None else train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
    )


def build_scheduler(optimizer, train: TrainSection, total_steps: int):
    warmup = warmup_steps(train, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, warmup, train.schedule, train.min_lr_ratio),
    )

"""The PPO optimizer: one AdamW with an actor group and, with a critic, a critic group."""

from __future__ import annotations

import torch

from ...schema import Recipe


def ppo_optimizer(arrangement, recipe: Recipe) -> torch.optim.AdamW:
    """Actor and critic parameter groups; the critic gets its own rate when it has its own
    adapter. Without a critic (critic-free estimators) there is only the actor group."""
    train, ppo = recipe.train, recipe.ppo
    shared = ppo.arrangement == "1base-1lora"
    actor, critic = [], []
    for name, param in arrangement.named_parameters():
        if param.requires_grad:
            is_critic = name.startswith(("value_head", "critic.", "rm_body.")) or ".critic." in name
            (critic if is_critic and not shared else actor).append(param)
    groups = [{"params": actor, "lr": train.lr}]
    if critic:
        groups.append({"params": critic, "lr": train.lr * ppo.critic_lr_ratio})
    return torch.optim.AdamW(groups, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                             weight_decay=train.weight_decay)

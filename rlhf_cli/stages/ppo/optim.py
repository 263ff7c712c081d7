"""The PPO optimizer: one AdamW with an actor group and, with a critic, a critic group (its own
learning rate, and with PPO-max's keys its own Adam betas and eps)."""

from __future__ import annotations

import torch

from ...schema import Recipe


def ppo_optimizer(arrangement, recipe: Recipe) -> torch.optim.AdamW:
    """Actor and critic parameter groups, as the arrangement lists them; the critic gets its
    own rate when it has weights of its own. Where actor and critic share weights
    (1base-1lora), and without a critic (critic-free estimators), there is one group."""
    train = recipe.train
    actor, critic = arrangement.actor_parameters(), arrangement.critic_parameters()
    _check_every_trainable_listed(arrangement, actor.keys() | critic.keys())
    if arrangement.shares_weights:
        actor, critic = {**actor, **critic}, {}
    groups = [{"params": list(actor.values()), "lr": train.lr}]
    if critic:
        groups.append({"params": list(critic.values()), **recipe.ppo.critic_optimizer(train)})
    return torch.optim.AdamW(groups, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                             weight_decay=train.weight_decay)


def _check_every_trainable_listed(arrangement, listed: set[str]) -> None:
    """A trainable weight that neither list names would silently never be updated."""
    unlisted = [name for name, p in arrangement.named_parameters() if p.requires_grad and name not in listed]
    if unlisted:
        raise RuntimeError(f"{arrangement.name}: trainable weights that are neither the actor's nor "
                           f"the critic's: {unlisted[:3]}")

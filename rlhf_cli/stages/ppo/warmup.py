"""Critic warm-up (`ppo.critic_warmup_steps`): the first iterations train the critic alone.

The actor's weights must not move then, in any arrangement. The update (update.py) keeps
the policy term in the graph at weight 0 (DDP expects every trainable weight to get a
gradient), leaves the ptx term out, and before the optimizer step drops the actor's
gradients (None), because a gradient that is there, even a zero one, still moves them:
AdamW's weight decay shrinks them, and in 1base-1lora the value loss reaches the adapter
the actor and the value head share. With None, AdamW skips those weights altogether: they
stay bitwise unchanged, get no Adam moments or step count, and their first update after
warm-up is a fresh Adam step (not one scaled by a bias correction that counted the warm-up).
So in 1base-1lora the warm-up trains the value head alone, on the states of the adapter as
it is. The gradient clipping norm is then the critic's alone. DeepSpeed applies its step
inside its backward, before the gradients could be dropped: warm-up is refused there
(schema_ppo.py).
"""

from __future__ import annotations


def drop_actor_gradients(wrapped) -> None:
    """Set the actor's gradients to None (`wrapped`: the arrangement, or DDP around it)."""
    for param in _unwrapped(wrapped).actor_parameters().values():
        param.grad = None


def _unwrapped(wrapped):
    while hasattr(wrapped, "module"):  # DDP's wrapper
        wrapped = wrapped.module
    return wrapped

"""The four PPO arrangements of actor, critic, reference and reward (DESIGN.md).

Each is a module whose forward (called through the DDP/DeepSpeed wrapper) returns the
actor's log-probs and entropy and the critic's values for a batch of rollouts; the
no-grad roles (reference log-probs, reward scores, generation) are methods called on the
unwrapped module, always in eval mode. The reference is always the untouched base:
adapters disabled (one-base arrangements) or a frozen copy (`separate`); nothing is ever
merged into it. `arrangement_build.py` constructs them from a recipe.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..errors import UserError
from .adapters import CRITIC, POLICY, REWARD, adapter_parameters, adapters_disabled, using_adapter
from .heads import (
    hidden_states,
    lm_loss,
    response_states,
    sequence_reward,
    token_logprobs_and_entropy,
)
from .reward import apply_head, score_sequences

# What one forward of an arrangement computes (`Arrangement.forward(part=...)`).
BOTH_PASSES, ACTOR_PASS, CRITIC_PASS = "both", "actor", "critic"


def in_eval_mode(method):
    """No grad, dropout off (a PPO update leaves the modules in train mode), mode restored."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return method(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return run


def _entries_of(state: dict, part: str) -> dict:
    """The entries of submodule `part` in a module's state dict, without the `part.` prefix."""
    prefix = f"{part}."
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


class Arrangement(torch.nn.Module):
    """Common plumbing; subclasses say where the critic's states and the reward come from.

    Attributes: `actor` (peft model with the policy adapter `default`), `value_head`
    (trainable [H -> 1], or None: a critic-free estimator trains no critic), `reward_head`
    (frozen, or None with a reward function). Each arrangement lists which of its weights
    the actor and the critic train (`actor_parameters`, `critic_parameters`), so that the
    optimizer, the EMA and saving never read that from parameter names.
    """

    name = "?"
    temperature = 1.0
    # Actor and critic train the same adapter (1base-1lora): one optimizer group at the actor's
    # rate, with the value loss weighed against the policy loss by ppo.vf_coef.
    shares_weights = False
    vf_coef = 1.0
    entropy_grad = False  # the update's entropy takes a gradient (ppo.entropy_coef > 0)
    # The critic's values come from another pass of the body than the actor's log-probs
    # (1base-2lora: the critic adapter on the same base). The update then runs a micro-batch
    # as two forward/backward passes, `forward(part=ACTOR_PASS)` then `part=CRITIC_PASS`, so
    # that only one pass's activations are alive at a time (stages/ppo/update.py).
    critic_in_own_pass = False

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    @property
    def critic_apart(self) -> bool:
        """Whether the update runs the critic in a forward/backward pass of its own."""
        return self.critic_in_own_pass and self.has_critic

    def configure(self, ppo) -> None:
        """The recipe settings the roles read: log-probs at the temperature the rollouts are
        sampled with (π/T), for every role; the value loss's weight in the update's loss,
        ppo.vf_coef where actor and critic share weights, 1 where the critic has its own (its
        pace is set by ppo.critic_lr_ratio instead)."""
        self.temperature = ppo.temperature
        self.vf_coef = ppo.vf_coef if self.shares_weights else 1.0
        self.entropy_grad = ppo.entropy_coef > 0

    def actor_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The policy's trainable weights (its LoRA adapter), by name in the arrangement."""
        return self._named(adapter_parameters(self.actor, POLICY))

    def critic_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The critic's own trainable weights, by name in the arrangement: the value head and
        the critic's adapter or model; none without a critic. Where the weights are shared
        (1base-1lora), the adapter the critic also trains is listed with the actor's."""
        if not self.has_critic:
            return {}
        return self._named([*self.value_head.parameters(), *self._critic_body_parameters()])

    def _critic_body_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def _named(self, params) -> dict[str, torch.nn.Parameter]:
        """The trainable ones of `params` under the names the arrangement's state dict (and so
        every checkpoint) gives them, in the arrangement's order."""
        wanted = {id(p) for p in params}
        return {name: p for name, p in self.named_parameters() if id(p) in wanted and p.requires_grad}

    def actor_state(self, state: dict) -> dict:
        """The actor's entries of a full state dict of the arrangement, named as in the actor's
        own state dict (what `actor.save_pretrained(state_dict=...)` takes)."""
        return _entries_of(state, "actor")

    def value_head_state(self, state: dict) -> dict:
        """The value head's entries of a full state dict of the arrangement, named as in the
        head's own; empty without a critic."""
        return _entries_of(state, "value_head")

    def forward(self, input_ids, attention_mask, prompt_width: int, tokens, with_entropy=True,
                ptx: dict | None = None, part: str = BOTH_PASSES):
        """(log π [B, R], V [B, R] or None without a critic, entropy [B, R] or None).

        With `ptx` (an SFT batch: input_ids, attention_mask, labels) a fourth output: the
        actor's token-mean LM loss on it, in the same forward, so that DDP and ZeRO see one
        graph per update. `part` ACTOR_PASS leaves the values out (None), CRITIC_PASS computes
        only the values (log π and entropy None; no ptx); only where `critic_apart`.
        """
        if part == CRITIC_PASS:
            return None, self.values(input_ids, attention_mask, prompt_width, None), None
        states = response_states(hidden_states(self.actor, input_ids, attention_mask), prompt_width)
        logp, entropy = token_logprobs_and_entropy(self.actor, states, tokens, self.temperature,
                                                   with_entropy, self.entropy_grad)
        with_values = self.has_critic and part == BOTH_PASSES
        values = self.values(input_ids, attention_mask, prompt_width, states) if with_values else None
        if ptx is None:
            return logp, values, entropy
        return logp, values, entropy, lm_loss(self.actor, ptx)

    def values(self, input_ids, attention_mask, prompt_width, actor_states) -> torch.Tensor:
        """V [B, R]: the value of the state before each response token."""
        raise NotImplementedError

    def _critic_values(self, body, input_ids, attention_mask, prompt_width) -> torch.Tensor:
        states = response_states(hidden_states(body, input_ids, attention_mask), prompt_width)
        return apply_head(self.value_head, states)

    def generation_model(self):
        return self.actor

    def generation_context(self):
        return contextlib.nullcontext()

    @in_eval_mode
    def reference_logprobs(self, input_ids, attention_mask, prompt_width: int, tokens):
        with self._reference() as model:
            states = response_states(hidden_states(model, input_ids, attention_mask), prompt_width)
            return token_logprobs_and_entropy(model, states, tokens, self.temperature, False)[0]

    @contextlib.contextmanager
    def _reference(self):
        with adapters_disabled(self.actor):
            yield self.actor

    @in_eval_mode
    def reward_scores(self, input_ids, attention_mask) -> torch.Tensor:
        """Raw RM score [B] of each prompt + response, as the RM itself scores it."""
        if self.reward_head is None and getattr(self, "reward_model", None) is None:
            raise UserError("this run has no reward model: set ppo.reward_model or ppo.reward_fn")
        return self._reward(input_ids, attention_mask)

    def _reward(self, input_ids, attention_mask) -> torch.Tensor:
        raise NotImplementedError

    def policy_for_saving(self):
        return self.actor


class OneBaseOneLora(Arrangement):
    """One base; one LoRA shared by actor and critic plus a value head; RM as a frozen adapter.

    One forward gives both logits and values. The shared adapter starts at zero (the actor
    starts equal to the reference); the value head from the RM's head when there is an RM.
    """

    name = "1base-1lora"
    shares_weights = True

    def __init__(self, actor, value_head: torch.nn.Linear, reward_head: torch.nn.Linear | None):
        super().__init__()
        self.actor, self.value_head, self.reward_head = actor, value_head, reward_head

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        return apply_head(self.value_head, actor_states)

    def _reward(self, input_ids, attention_mask):
        with using_adapter(self.actor, REWARD):
            return sequence_reward(self.actor, self.reward_head, input_ids, attention_mask)


class OneBaseTwoLora(OneBaseOneLora):
    """One base; actor LoRA; critic LoRA (a trainable copy of the RM adapter) + value head;
    the RM adapter itself frozen."""

    name = "1base-2lora"
    shares_weights = False
    critic_in_own_pass = True

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        with using_adapter(self.actor, CRITIC):
            return self._critic_values(self.actor, input_ids, attention_mask, prompt_width)

    def _critic_body_parameters(self):
        return adapter_parameters(self.actor, CRITIC)


class TwoBase(Arrangement):
    """Policy base + actor LoRA; RM base (`rm_body`) with a trainable critic adapter (its
    active adapter) and the frozen RM adapter; without a critic, only the RM adapter."""

    name = "2base-2lora"

    def __init__(self, actor, rm_body, value_head, reward_head):
        super().__init__()
        self.actor, self.rm_body = actor, rm_body
        self.value_head, self.reward_head = value_head, reward_head

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        return self._critic_values(self.rm_body, input_ids, attention_mask, prompt_width)

    def _critic_body_parameters(self):
        return adapter_parameters(self.rm_body, CRITIC)

    def _reward(self, input_ids, attention_mask):
        with using_adapter(self.rm_body, REWARD):
            return sequence_reward(self.rm_body, self.reward_head, input_ids, attention_mask)


class Separate(Arrangement):
    """Four models: actor, critic (a trainable copy of the RM), frozen reference, frozen RM
    (a sequence classifier, scored exactly as `rlhf eval` scores it); without a critic, three."""

    name = "separate"
    reward_head = None

    def __init__(self, actor, reference, critic, value_head, reward_model):
        super().__init__()
        # reference None: ppo.kl_coef 0 loads no reference copy (no KL term, no reference forward)
        self.reference = reference.requires_grad_(False) if reference is not None else None
        self.actor, self.critic = actor, critic
        self.value_head = value_head
        self.reward_model = reward_model.requires_grad_(False) if reward_model is not None else None

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        return self._critic_values(self.critic, input_ids, attention_mask, prompt_width)

    def _critic_body_parameters(self):
        return list(self.critic.parameters())

    @contextlib.contextmanager
    def _reference(self):
        if self.reference is None:
            raise RuntimeError("this arrangement was built without a reference (ppo.kl_coef 0)")
        yield self.reference

    def _reward(self, input_ids, attention_mask):
        return score_sequences(self.reward_model, input_ids, attention_mask)

"""The four PPO arrangements of actor, critic, reference and reward (DESIGN.md).

Each is a module whose forward (called through the DDP/DeepSpeed wrapper) returns the
actor's log-probs and entropy and the critic's values for a batch of rollouts; the
no-grad roles (reference log-probs, reward scores, generation) are methods called on the
unwrapped module. The reference is always the untouched base: adapters disabled (one-base
arrangements) or a frozen copy (`separate`); nothing is ever merged into it.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ...errors import UserError
from ...models.loading import add_lora, load_causal_lm, resolve_base
from ...schema import Recipe
from .adapters import CRITIC, REWARD, add_frozen_adapter, rm_adapter_dir, same_base, using_adapter
from .heads import (
    hidden_states,
    linear_head_from,
    response_states,
    sequence_reward,
    token_logprobs_and_entropy,
    zero_head,
)


class Arrangement(torch.nn.Module):
    """Common plumbing; subclasses say where each role's states come from."""

    name = "?"
    temperature = 1.0

    def forward(self, input_ids, attention_mask, prompt_width: int, tokens, with_entropy=True):
        states = response_states(hidden_states(self.actor, input_ids, attention_mask), prompt_width)
        logp, entropy = token_logprobs_and_entropy(self.actor, states, tokens, self.temperature,
                                                   with_entropy)
        return logp, self.values(input_ids, attention_mask, prompt_width, states), entropy

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        raise NotImplementedError

    def generation_model(self):
        return self.actor

    def generation_context(self):
        return contextlib.nullcontext()

    def reference_context(self):
        return self.actor.disable_adapter()

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, prompt_width: int, tokens):
        with self.reference_context():
            model = self.reference_model()
            states = response_states(hidden_states(model, input_ids, attention_mask), prompt_width)
            return token_logprobs_and_entropy(model, states, tokens, self.temperature, False)[0]

    def reference_model(self):
        return self.actor

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask) -> torch.Tensor:
        raise UserError("this arrangement has no reward model: set ppo.reward_model or ppo.reward_fn")

    def policy_for_saving(self):
        return self.actor


class OneBaseOneLora(Arrangement):
    """One base; one LoRA shared by actor and critic plus a value head; RM as a frozen adapter.

    One forward gives both logits and values. The value head starts from the RM's head,
    the shared adapter from zero (so the actor starts equal to the reference).
    """

    name = "1base-1lora"

    def __init__(self, actor, reward_head: torch.nn.Linear | None, hidden_size: int):
        super().__init__()
        self.actor = actor
        self.reward_head = reward_head
        start = reward_head.weight if reward_head is not None else None
        self.value_head = linear_head_from(start, True) if start is not None else zero_head(hidden_size)

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        return self.value_head(actor_states).squeeze(-1).float()

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask):
        if self.reward_head is None:
            return super().reward_scores(input_ids, attention_mask)
        with using_adapter(self.actor, REWARD):
            return sequence_reward(self.actor, self.reward_head, input_ids, attention_mask)


class OneBaseTwoLora(OneBaseOneLora):
    """One base; actor LoRA; critic LoRA (a copy of the RM adapter) + value head; RM adapter."""

    name = "1base-2lora"

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        with using_adapter(self.actor, CRITIC):
            states = response_states(hidden_states(self.actor, input_ids, attention_mask), prompt_width)
        return self.value_head(states).squeeze(-1).float()


class TwoBase(Arrangement):
    """Policy base + actor LoRA; RM base with frozen RM adapter and a trainable critic adapter."""

    name = "2base-2lora"

    def __init__(self, actor, rm_body, reward_head: torch.nn.Linear | None, hidden_size: int):
        super().__init__()
        self.actor, self.rm_body, self.reward_head = actor, rm_body, reward_head
        start = reward_head.weight if reward_head is not None else None
        self.value_head = linear_head_from(start, True) if start is not None else zero_head(hidden_size)

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        with using_adapter(self.rm_body, CRITIC):
            states = response_states(hidden_states(self.rm_body, input_ids, attention_mask), prompt_width)
        return self.value_head(states).squeeze(-1).float()

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask):
        if self.reward_head is None:
            return super().reward_scores(input_ids, attention_mask)
        with using_adapter(self.rm_body, REWARD):
            return sequence_reward(self.rm_body, self.reward_head, input_ids, attention_mask)


class Separate(Arrangement):
    """Four models: actor, critic (a copy of the RM), frozen reference, frozen RM."""

    name = "separate"

    def __init__(self, actor, reference, critic, reward_model, reward_head, hidden_size: int):
        super().__init__()
        self.actor, self.reference, self.critic = actor, reference.requires_grad_(False), critic
        self.reward_model = reward_model.requires_grad_(False) if reward_model is not None else None
        self.reward_head = reward_head
        start = reward_head.weight if reward_head is not None else None
        self.value_head = linear_head_from(start, True) if start is not None else zero_head(hidden_size)

    def values(self, input_ids, attention_mask, prompt_width, actor_states):
        states = response_states(hidden_states(self.critic, input_ids, attention_mask), prompt_width)
        return self.value_head(states).squeeze(-1).float()

    def reference_context(self):
        return contextlib.nullcontext()

    def reference_model(self):
        return self.reference

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask):
        if self.reward_model is None:
            return super().reward_scores(input_ids, attention_mask)
        return sequence_reward(self.reward_model, self.reward_head, input_ids, attention_mask)


# ------------------------------------------------------------------------- building


def _actor(recipe: Recipe):
    if recipe.model.lora is None:
        raise UserError("PPO arrangements train LoRA adapters: set model.lora (full fine-tuning "
                        "of the actor is not supported yet)", where="model.lora")
    return add_lora(load_causal_lm(recipe.model), recipe.model.lora)


def _rm_parts(recipe: Recipe, policy_base: str, one_base: bool):
    """(RM adapter dir or None) after checking it was trained on the policy's base."""
    if not recipe.ppo.reward_model:
        return None
    adapter_dir = rm_adapter_dir(recipe.ppo.reward_model)
    if one_base and not same_base(adapter_dir, policy_base):
        raise UserError(
            f"the reward model {recipe.ppo.reward_model} was trained on another base than the "
            f"policy ({policy_base}); one-base arrangements need the same base (or use "
            "ppo.arrangement: 2base-2lora / separate)", where="ppo.reward_model")
    return adapter_dir


def build_arrangement(recipe: Recipe) -> Arrangement:
    kind = recipe.ppo.arrangement
    policy_base = resolve_base(recipe.model.base)
    actor = _actor(recipe)
    hidden = actor.config.hidden_size
    adapter_dir = _rm_parts(recipe, policy_base, one_base=kind.startswith("1base"))
    reward_head = None
    if kind in ("1base-1lora", "1base-2lora"):
        if adapter_dir is not None:
            reward_head = linear_head_from(add_frozen_adapter(actor, adapter_dir, REWARD), False)
        if kind == "1base-1lora":
            return OneBaseOneLora(actor, reward_head, hidden)
        if adapter_dir is not None:  # the critic starts from the RM adapter
            add_frozen_adapter(actor, adapter_dir, CRITIC, trainable=True)
        else:
            actor.add_adapter(CRITIC, copy.deepcopy(actor.peft_config["default"]))
            _set_trainable(actor, CRITIC)
        return OneBaseTwoLora(actor, reward_head, hidden)
    if kind == "2base-2lora":
        return _two_base(recipe, actor, adapter_dir, hidden)
    return _separate(recipe, actor, adapter_dir, hidden)


def _set_trainable(peft_model, adapter: str) -> None:
    for name, param in peft_model.named_parameters():
        if f".{adapter}." in name:
            param.requires_grad_(True)


def _rm_base_model(recipe: Recipe, adapter_dir):
    from peft import get_peft_model

    from ...models.loading import lora_config

    base = _adapter_base(adapter_dir) if adapter_dir is not None else resolve_base(recipe.model.base)
    body = load_causal_lm(recipe.model, source=base)
    # A placeholder first adapter: the body only ever runs under `critic` or `reward`.
    return get_peft_model(body, lora_config(recipe.model.lora)), base


def _two_base(recipe, actor, adapter_dir, hidden):
    rm_body, _ = _rm_base_model(recipe, adapter_dir)
    reward_head = None
    if adapter_dir is not None:
        reward_head = linear_head_from(add_frozen_adapter(rm_body, adapter_dir, REWARD), False)
        add_frozen_adapter(rm_body, adapter_dir, CRITIC, trainable=True)
    else:
        rm_body.add_adapter(CRITIC, copy.deepcopy(rm_body.peft_config["default"]))
    _freeze_except(rm_body, CRITIC)
    return TwoBase(actor, rm_body, reward_head, rm_body.config.hidden_size)


def _freeze_except(peft_model, adapter: str) -> None:
    for name, param in peft_model.named_parameters():
        param.requires_grad_(f".{adapter}." in name)


def _separate(recipe, actor, adapter_dir, hidden):
    reference = load_causal_lm(recipe.model).requires_grad_(False)
    reward_model, reward_head = None, None
    if adapter_dir is not None:
        reward_model = _merged_rm(recipe, adapter_dir)
        reward_head = linear_head_from(_rm_head(adapter_dir), False)
        critic = copy.deepcopy(reward_model).requires_grad_(False)
    else:
        critic = load_causal_lm(recipe.model).requires_grad_(False)
    critic = add_lora(critic, recipe.model.lora)
    return Separate(actor, reference, critic, reward_model, reward_head, hidden)


def _adapter_base(adapter_dir) -> str:
    import json

    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def _rm_head(adapter_dir):
    from .adapters import split_rm_state

    return split_rm_state(adapter_dir)[1]


def _merged_rm(recipe, adapter_dir):
    """The RM's base with its LoRA merged in (a separate model: nothing shared with the actor)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from .adapters import split_rm_state

    body = load_causal_lm(recipe.model, source=_adapter_base(adapter_dir))
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.modules_to_save, config.task_type = None, "CAUSAL_LM"
    model = get_peft_model(body, config)
    set_peft_model_state_dict(model, split_rm_state(adapter_dir)[0])
    return model.merge_and_unload()

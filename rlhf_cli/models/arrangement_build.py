"""Building an arrangement (arrangements.py) from a recipe: which bases to load, which adapters
go where, and where the critic and the reward come from.

- The actor is the policy base with a fresh LoRA (B = 0): it starts equal to the reference.
- The critic starts from the reward model (its adapter and head) when there is one; with
  only a reward function it starts from the policy base with a fresh adapter and a zero head.
- In one-base arrangements the RM adapter must have been trained on the policy's base.
- A critic-free estimator (`ppo.advantage` other than gae) builds no critic: no value head,
  no critic adapter or model. config.py refuses 1base-2lora then (its second adapter is the
  critic), and 2base-2lora without a reward model (its second base would hold nothing).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import UserError
from ..schema import Recipe
from .adapters import (
    CRITIC,
    POLICY,
    REWARD,
    WHERE,
    adapter_base,
    adapter_parameters,
    add_rm_adapter,
    checkpoint_under_forward_adapter,
    peft_with_rm_adapter,
    reward_model_dir,
    same_base,
)
from .arrangements import Arrangement, OneBaseOneLora, OneBaseTwoLora, Separate, TwoBase
from .dropout import apply_dropout_setting
from .heads import linear_head_from, zero_head
from .loading import (
    add_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    lora_config,
    resolve_base,
)
from .logits import check_head
from .reward_judge import check_same_tokenizer, classifier_for, frozen_reward_model


def build_arrangement(recipe: Recipe, tokenizer=None, announce: bool = False) -> Arrangement:
    """The arrangement named by `ppo.arrangement`; `tokenizer` (the policy's) lets a
    two-base arrangement check that the RM reads the same token ids."""
    if recipe.model.lora is None:
        raise UserError("PPO arrangements train LoRA adapters: set model.lora (full fine-tuning "
                        "of the actor is not supported yet)", where="model.lora")
    kind = recipe.ppo.arrangement
    critic = needs_critic(recipe)
    rm_dir, rm_kind = _reward_model(recipe, kind)
    if rm_dir is not None and tokenizer is not None and not kind.startswith("1base"):
        _check_tokenizer(rm_dir, tokenizer, recipe.model.trust_remote_code)
    actor = add_lora(load_causal_lm(recipe.model), recipe.model.lora)
    check_head(actor, "ppo")  # an unusable head is an error before anything runs
    if kind in ("1base-1lora", "1base-2lora"):
        arrangement = _one_base(recipe, actor, rm_dir, two_lora=kind == "1base-2lora", critic=critic)
    elif kind == "2base-2lora":
        arrangement = _two_base(recipe, actor, rm_dir, critic)
    else:
        arrangement = _separate(recipe, actor, rm_dir, rm_kind, critic)
    arrangement.configure(recipe.ppo)
    # Every role at once, once all adapters are in: old log-probs and values come from eval
    # mode, so dropout in the update's forward would move the first ratio away from 1.
    apply_dropout_setting(arrangement, recipe, announce)
    return arrangement


def needs_critic(recipe: Recipe) -> bool:
    return recipe.ppo.estimator.needs_critic


def _reward_model(recipe: Recipe, kind: str):
    """(RM directory, `adapter` | `full`), or (None, None) without `ppo.reward_model`."""
    if not recipe.ppo.reward_model:
        return None, None
    rm_dir, rm_kind = reward_model_dir(recipe.ppo.reward_model)
    if rm_kind == "full" and kind != "separate":
        raise UserError(f"{recipe.ppo.reward_model} is a full reward model; the {kind} arrangement "
                        "needs an RM trained with LoRA (or use ppo.arrangement: separate)", where=WHERE)
    policy_base = resolve_base(recipe.model.base)
    if kind.startswith("1base") and not same_base(rm_dir, policy_base):
        raise UserError(
            f"the reward model {recipe.ppo.reward_model} was trained on {adapter_base(rm_dir)}, not on "
            f"the policy's base {policy_base}; one-base arrangements need the same base (train the RM "
            "on model.base, or use ppo.arrangement: 2base-2lora or separate)", where=WHERE)
    return rm_dir, rm_kind


def _check_tokenizer(rm_dir, tokenizer, trust_remote_code: bool = False) -> None:
    check_same_tokenizer(rm_dir, tokenizer, trust_remote_code, WHERE)


def _set_trainable(peft_model, adapter: str) -> None:
    for param in adapter_parameters(peft_model, adapter):
        param.requires_grad_(True)


def _one_base(recipe: Recipe, actor, rm_dir, two_lora: bool, critic: bool) -> Arrangement:
    reward_head, value_head = None, zero_head(actor.config.hidden_size) if critic else None
    if rm_dir is not None:
        head = add_rm_adapter(actor, rm_dir, REWARD)
        reward_head = linear_head_from(head, False)
        value_head = linear_head_from(head, True) if critic else None
    if not two_lora:
        return OneBaseOneLora(actor, value_head, reward_head)
    if rm_dir is not None:  # the critic adapter starts as a trainable copy of the RM adapter
        add_rm_adapter(actor, rm_dir, CRITIC, trainable=True)
    else:
        actor.add_adapter(CRITIC, copy.deepcopy(actor.peft_config[POLICY]))
        _set_trainable(actor, CRITIC)
    # The critic runs under its own adapter inside the forward: recomputation must too.
    checkpoint_under_forward_adapter(actor)
    return OneBaseTwoLora(actor, value_head, reward_head)


def _load_rm_base(recipe: Recipe, base: str):
    """The base the RM adapter names in its adapter_config.json (a path or a hub name)."""
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise UserError(f"the reward model's base {base} (named in its adapter_config.json) is not "
                        "found", where=WHERE)
    try:
        return load_causal_lm(recipe.model, source=base)
    except UserError as exc:  # its message names model.base: say which base it really was
        raise UserError(f"cannot load the reward model's base {base} ({exc})", where=WHERE) from None


def _two_base(recipe: Recipe, actor, rm_dir, critic: bool) -> Arrangement:
    from peft import get_peft_model

    if not critic:  # the RM base holds only the frozen RM adapter
        rm_body, head = peft_with_rm_adapter(_load_rm_base(recipe, adapter_base(rm_dir)), rm_dir, REWARD,
                                             trainable=False)
        return TwoBase(actor, rm_body, None,
                       linear_head_from(head, False))
    if rm_dir is None:  # reward function: the second base is the policy's, with a fresh critic
        body = load_causal_lm(recipe.model)
        rm_body = get_peft_model(body, lora_config(recipe.model.lora, model=body), adapter_name=CRITIC)
        return TwoBase(actor, rm_body, zero_head(body.config.hidden_size), None)
    rm_body, head = peft_with_rm_adapter(_load_rm_base(recipe, adapter_base(rm_dir)), rm_dir, CRITIC,
                                         trainable=True)
    add_rm_adapter(rm_body, rm_dir, REWARD)  # only ever used under no_grad
    reward_head = linear_head_from(head, False)
    return TwoBase(actor, rm_body, linear_head_from(head, True), reward_head)


def _sequence_classifier(recipe: Recipe, source: str):
    return classifier_for(recipe.model, source, WHERE)


def _separate(recipe: Recipe, actor, rm_dir, rm_kind, with_critic: bool) -> Arrangement:
    # ppo.kl_coef 0 (DAPO / Dr. GRPO): no KL term, so no reference copy to hold in memory
    reference = load_causal_lm(recipe.model).requires_grad_(False) if recipe.ppo.kl_coef != 0 else None
    if not with_critic:  # actor, reference and (with an RM run) the reward model
        return Separate(actor, reference, None, None, _frozen_reward_model(recipe, rm_dir, rm_kind))
    if rm_dir is None:
        critic = add_lora(load_causal_lm(recipe.model), recipe.model.lora)
        return Separate(actor, reference, critic, zero_head(actor.config.hidden_size), None)
    if rm_kind == "adapter":
        from peft import PeftModel

        base = adapter_base(rm_dir)
        critic, head = peft_with_rm_adapter(_load_rm_base(recipe, base), rm_dir, POLICY, trainable=True)
        reward_model = PeftModel.from_pretrained(_sequence_classifier(recipe, base), str(rm_dir))
    else:
        reward_model = _sequence_classifier(recipe, str(rm_dir))
        head = reward_model.score.weight
        body = copy.deepcopy(reward_model)
        body.score = torch.nn.Identity()  # the critic's head is the value head
        if recipe.model.gradient_checkpointing:
            enable_gradient_checkpointing(body)
        critic = add_lora(body, recipe.model.lora, task_type=None)
    return Separate(actor, reference, critic, linear_head_from(head, True), reward_model.eval())


def _frozen_reward_model(recipe: Recipe, rm_dir, rm_kind):
    """The RM as `rlhf eval` loads it; None with a reward function."""
    return None if rm_dir is None else frozen_reward_model(recipe.model, rm_dir, rm_kind, WHERE)

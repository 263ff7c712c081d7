"""Dropout off for the stages that compare two forwards of one model (`train.disable_dropout`).

DPO, KTO and the RM compare log-probs or scores of one batch, and PPO's ratio divides the
training forward's probabilities by the rollout's (taken in eval mode): with dropout on, the
first DPO loss is not log 2 and the first PPO ratio is not 1 before any update. So, as trl
does for its preference trainers, these stages train with every dropout at 0 unless the
recipe says otherwise; SFT keeps the model's own dropout.

Setting `p = 0` on `nn.Dropout` modules (LoRA's, GPT-2's, Phi's) is not enough: many
families call `F.dropout` with a float they keep on the module (LLaMA-style
`attention_dropout`, OPT's `dropout` and `layerdrop`, BLOOM's `hidden_dropout`) or read
from the config during the forward (Falcon). Those are set to 0 as well. A full model saved
afterwards therefore records dropout 0 in its config.json (what it was trained with); a
LoRA adapter's adapter_config.json keeps the recipe's `lora.dropout`, as peft wrote it.
"""

from __future__ import annotations

import re

import torch

# Names of float attributes (on modules and configs) that are drop probabilities.
_DROP_NAME = re.compile(r"dropout|pdrop|layerdrop", re.IGNORECASE)

# Stages whose training compares forwards of the same model (see the module docstring).
DROPOUT_OFF_STAGES = ("rm", "dpo", "ppo")


def dropout_disabled(recipe) -> bool:
    """`train.disable_dropout`, or by stage when it is null: off for rm/dpo/ppo, kept for sft."""
    setting = recipe.train.disable_dropout
    return recipe.stage in DROPOUT_OFF_STAGES if setting is None else setting


def _zero_drop_floats(obj) -> int:
    """Set every positive float attribute named like a drop probability to 0; how many."""
    count = 0
    for name, value in list(vars(obj).items()):
        if isinstance(value, float) and value > 0 and _DROP_NAME.search(name):
            setattr(obj, name, 0.0)
            count += 1
    return count


def _zero_config(config, seen: set[int]) -> int:
    """The config's drop probabilities and those of its sub-configs (e.g. `text_config`)."""
    from transformers import PretrainedConfig

    if id(config) in seen:
        return 0
    seen.add(id(config))
    count = _zero_drop_floats(config)
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            count += _zero_config(value, seen)
    return count


def disable_dropout(model: torch.nn.Module) -> int:
    """Every dropout in `model` to 0 (modules, module floats, configs); how many were > 0."""
    from transformers import PretrainedConfig

    count, seen_configs = 0, set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            count += 1
        count += _zero_drop_floats(module)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            count += _zero_config(config, seen_configs)
    return count


def apply_dropout_setting(model: torch.nn.Module, recipe, announce: bool = False) -> None:
    """The one place a stage's trainable model gets `train.disable_dropout` applied.

    Call it once the model is complete (LoRA adapters added: their dropouts are modules too).
    """
    if not dropout_disabled(recipe):
        return
    count = disable_dropout(model)
    if announce and count:
        from ..engine.progress import console

        console.print(f"dropout: {count} dropout settings set to 0 for {recipe.stage} "
                      "(train.disable_dropout: false keeps them)", highlight=False)

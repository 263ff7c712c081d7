"""The tokenizer and the policy model every stage starts from, as the recipe describes them."""

from __future__ import annotations

from ..engine.progress import console
from ..schema import Recipe
from .dropout import apply_dropout_setting
from .loading import (
    add_lora,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resolve_base,
)


def tokenizer_for(recipe: Recipe):
    source = resolve_base(recipe.model.tokenizer or recipe.model.base)
    return load_tokenizer(source, recipe.model.trust_remote_code)


def policy_model(recipe: Recipe, announce: bool = True):
    """The base causal LM, with a fresh LoRA adapter unless `model.lora` is null, and dropout
    as `train.disable_dropout` says for the recipe's stage."""
    model = load_causal_lm(recipe.model)
    if recipe.model.lora is not None:
        model = add_lora(model, recipe.model.lora)
    apply_dropout_setting(model, recipe, announce)
    if announce:
        trainable, total = count_parameters(model)
        console.print(f"model: {recipe.model.base}  trainable {trainable:,} / {total:,} "
                      f"parameters ({100 * trainable / max(total, 1):.2f}%)")
    return model

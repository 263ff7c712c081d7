"""Pieces every stage needs: the tokenizer, the policy model, generation scoring."""

from __future__ import annotations

import torch

from ..engine.progress import console
from ..models.dropout import apply_dropout_setting
from ..models.loading import (
    add_lora,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resolve_base,
)
from ..models.zero3 import weights_gathered_once
from ..schema import Recipe


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


def say(backend, text: str) -> None:
    if backend.is_main:
        console.print(text, highlight=False)


@torch.no_grad()
def generate(lm, prompt_ids: list[list[int]], tokenizer, max_new_tokens: int, *,
             do_sample: bool = False, temperature: float = 1.0, synced: bool = False) -> list[list[int]]:
    """Responses (token ids, up to and without the first EOS) for left-padded prompts."""
    device = next(lm.parameters()).device
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    was_training = lm.training
    lm.eval()
    with weights_gathered_once(lm):  # ZeRO-3: one all-gather per call, not one per token
        out = lm.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=None, top_k=None,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced,
        )
    lm.train(was_training)
    responses = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        responses.append(row)
    return responses

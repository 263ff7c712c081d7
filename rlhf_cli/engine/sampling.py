"""Greedy or sampled responses from a causal LM, for evaluation by generation."""

from __future__ import annotations

import torch

from ..models.zero3 import weights_gathered_once


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
            max_new_tokens=max_new_tokens, do_sample=do_sample, **_sampling(do_sample, temperature),
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced,
        )
    lm.train(was_training)
    responses = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        responses.append(row)
    return responses


def _sampling(do_sample: bool, temperature: float) -> dict:
    """Sampling from exactly softmax(logits / T): every setting that would reshape it is pinned,
    or the model's generation_config.json (a repetition penalty, top-p) would apply."""
    if not do_sample:
        return {"temperature": None, "top_p": None, "top_k": None}
    return {"temperature": temperature, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
            "typical_p": 1.0}

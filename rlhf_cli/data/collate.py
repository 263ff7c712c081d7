"""Batching tokenized examples into right-padded tensors."""

from __future__ import annotations

import torch

from rlhf_cli.data.sft import IGNORE_INDEX


def pad_batch(examples: list[dict], pad_token_id: int | None,
              pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids`/`labels` into `input_ids`, `attention_mask`, `labels` tensors.

    The attention mask and the -100 labels come from each example's real length, never from
    comparing ids with `pad_token_id`: the pad token is often the EOS, which must keep its loss.
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    # Pad positions are masked out and ignored by the loss, so any id works when none is set
    pad = 0 if pad_token_id is None else pad_token_id
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_pairs(examples: list[dict], pad_token_id: int | None,
              pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Preference pairs as one right-padded batch: the B chosen rows, then the B rejected rows.

    `input_ids`, `attention_mask`, `labels` are [2B, T], so one forward pass scores both sides;
    row i and row B + i are the two answers to the same prompt. Padding as in `pad_batch`.
    """
    sides = [{"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"]}
             for side in ("chosen", "rejected") for e in examples]
    return pad_batch(sides, pad_token_id, pad_to_multiple_of)


def pad_prompts(examples: list[dict], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """`prompt_input_ids` LEFT-padded into `input_ids` and `attention_mask` [B, T], for generation.

    Left padding puts every prompt's last token in the last column, where generation continues.
    """
    if not examples:
        raise ValueError("pad_prompts needs at least one example")
    width = max(len(e["prompt_input_ids"]) for e in examples)
    pad = 0 if pad_token_id is None else pad_token_id
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["prompt_input_ids"])
        if length:
            input_ids[row, width - length:] = torch.tensor(example["prompt_input_ids"])
            attention_mask[row, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

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

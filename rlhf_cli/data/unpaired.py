"""Unpaired (KTO) rows: `prompt` (or `instruction`), `completion`, `label`.

Kept apart from the paired formats in preference.py, whose row parsing it reuses; encoded as
one answer after its prompt (pair_tokens.py). Also preference pairs seen as unpaired examples
(`UnpairedView`), KTO's other input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhf_cli.data.lazy import LazyExamples
from rlhf_cli.data.pair_tokens import encode_answers, shared_prompt
from rlhf_cli.data.preference import (
    Drop,
    PairDrop,
    _finish,
    _response,
    prompt_text,
    prompt_turns,
    with_location,
)
from rlhf_cli.data.sft import IGNORE_INDEX, DropReason, DropReport, _check_lengths, fit_lengths
from rlhf_cli.data.templates import Template, get_template
from rlhf_cli.errors import UserError


def tokenize_completion(prompt_conversation: list[dict], completion: str, tokenizer: Any,
                        template: Template | str, max_length: int,
                        max_prompt_length: int | None = None) -> dict | Drop:
    """`{"input_ids", "labels", "truncated"}` with loss on the final answer only (KTO rows).

    Unlike `tokenize_conversation`, earlier assistant turns are context, as in `tokenize_pair`.
    """
    if isinstance(template, str):
        template = get_template(template)
    if not completion.strip():
        return DropReason.EMPTY_RESPONSE
    (side,) = encode_answers(prompt_conversation, [completion], tokenizer, template)
    prompt, responses = shared_prompt(side, side)
    fitted = fit_lengths(prompt, responses[:1], ["response"], tokenizer, max_length, max_prompt_length)
    if not isinstance(fitted, tuple):
        return fitted
    prompt, (response,), truncated = fitted
    return {"input_ids": [t.id for t in prompt + response],
            "labels": [IGNORE_INDEX] * len(prompt) + [t.id for t in response],
            "truncated": truncated}


def to_unpaired(row: dict, where: str) -> tuple[list[dict], str, bool] | Drop:
    """KTO rows `prompt` (or `instruction`), `completion`, `label` -> (conversation, text, label)."""
    if "completion" not in row or "label" not in row or not ("prompt" in row or "instruction" in row):
        raise UserError("expected fields 'prompt' (or 'instruction'), 'completion' and 'label'; "
                        f"this row has: {', '.join(map(repr, row)) or 'no fields'}", where=where)
    if row["completion"] is None:
        return PairDrop.MISSING
    turns, completion = _response(row["completion"], "completion", where)
    label = row["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0"):
        label = label.strip().lower() in ("true", "1")  # csv cells are text
    if label not in (True, False):
        raise UserError(f"'label' must be true or false, got {label!r}", where=where)
    if not completion.strip():
        return DropReason.EMPTY_RESPONSE
    return turns or prompt_turns(row, where), completion, bool(label)


def build_unpaired_dataset(rows: list[dict], tokenizer: Any, template: str, max_length: int,
                           max_prompt_length: int | None, source: str
                           ) -> tuple[LazyExamples, DropReport]:
    """KTO examples `{"input_ids", "labels", "label", "prompt", "completion"}` and a DropReport."""
    _check_lengths(max_length, max_prompt_length)
    template_obj = get_template(template)  # an unknown name fails before any row is read

    def make(row: dict, where: str) -> dict | Drop:
        item = to_unpaired(row, where)
        if not isinstance(item, tuple):
            return item
        conversation, completion, label = item
        result = with_location(where, tokenize_completion, conversation, completion, tokenizer,
                               template_obj, max_length, max_prompt_length)
        if not isinstance(result, dict):
            return result
        return {**result, "label": label, "prompt": prompt_text(conversation),
                "completion": completion}

    report = DropReport(total=len(rows))
    examples = LazyExamples.build(rows, source, make, report)
    return examples, _finish(report, examples, source)


class UnpairedView(Sequence):
    """Preference pairs seen as unpaired examples: 2i is pair i's chosen, 2i+1 its rejected.

    A view, not a copy, so that lazily tokenized pair data stays lazy.
    """

    def __init__(self, pairs, positions: range | None = None):
        self.pairs = pairs
        self.positions = range(2 * len(pairs)) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):  # a view too: evaluation slices its shard per batch
            return UnpairedView(self.pairs, self.positions[index])
        position = self.positions[index]
        side = "chosen" if position % 2 == 0 else "rejected"
        pair = self.pairs[position // 2]
        return {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"],
                "label": side == "chosen"}


def is_unpaired(rows) -> bool:
    first = rows[0] if len(rows) else {}
    return isinstance(first, dict) and "completion" in first and "label" in first

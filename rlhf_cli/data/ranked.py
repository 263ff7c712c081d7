"""Ranked rows for RRHF: K scored responses to one prompt, as token ids and labels.

Accepted rows:
- `prompt` (a string or a list of messages) or `instruction` (+ `input`), `responses` (K >= 2
  strings) and `scores` (K finite numbers): what `rlhf generate` writes with a judge;
- any preference pair `preference.py` reads: K = 2, the chosen answer scored above the rejected
  (1 and 0).

A row with the wrong shape (`responses` and `scores` of different lengths, fewer than two
responses, a score that is not a finite number) is an error naming its file and row: a file of
scored samples with one bad row probably has more. An empty response stays: a model that
stopped at once wrote it, and its score says how good that was (it is an EOS alone). All the
responses of a row share its prompt token for token; truncation is SFT's (pair_tokens.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_cli.data.collate import pad_batch
from rlhf_cli.data.lazy import LazyExamples
from rlhf_cli.data.pair_tokens import encode_answers, shared_prompt
from rlhf_cli.data.preference import Drop, _finish, prompt_text, prompt_turns, to_preference, with_location
from rlhf_cli.data.sft import IGNORE_INDEX, DropReport, _check_lengths, fit_lengths
from rlhf_cli.data.templates import Template, get_template
from rlhf_cli.errors import UserError

Ranked = tuple[list[dict], list[str], list[float]]  # (prompt conversation, responses, scores)


def _responses(row: dict, where: str) -> list[str]:
    responses = row["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise UserError("'responses' must be a list of strings", where=where)
    if len(responses) < 2:
        raise UserError(f"RRHF ranks several responses to a prompt: this row has {len(responses)} "
                        "(give 2 or more)", where=where)
    return responses


def _scores(row: dict, count: int, where: str) -> list[float]:
    if "scores" not in row:
        raise UserError("'responses' without 'scores': RRHF needs each response's score (sample "
                        "with a judge: rlhf generate --reward-fn F or --reward-model RM)", where=where)
    scores = row["scores"]
    if not isinstance(scores, list):
        raise UserError(f"'scores' must be a list of numbers, got {type(scores).__name__}", where=where)
    if len(scores) != count:
        raise UserError(f"'responses' has {count} items but 'scores' has {len(scores)}: "
                        "one score per response", where=where)
    for index, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise UserError(f"scores[{index}] is {score!r}, not a finite number", where=where)
    return [float(s) for s in scores]


def to_ranked(row: dict, where: str, keep_text: bool = False) -> Ranked | Drop:
    """(prompt conversation, responses, scores) of one row, or why a preference pair is skipped."""
    if "responses" not in row:
        pair = to_preference(row, where, keep_text)
        if not isinstance(pair, tuple):
            return pair
        conversation, chosen, rejected = pair
        return conversation, [chosen, rejected], [1.0, 0.0]
    if not ("prompt" in row or "instruction" in row):
        raise UserError("a row with 'responses' needs its 'prompt' (or 'instruction')", where=where)
    responses = _responses(row, where)
    return prompt_turns(row, where), responses, _scores(row, len(responses), where)


def tokenize_ranked(conversation: list[dict], responses: list[str], tokenizer: Any,
                    template: Template, max_length: int, max_prompt_length: int | None) -> dict | Drop:
    """`response{i}_input_ids` / `response{i}_labels` for i < K (loss on the answers only),
    `num_responses` K and `truncated`; or why the row cannot fit."""
    sides = encode_answers(conversation, responses, tokenizer, template)
    prompt, answers = shared_prompt(*sides)
    fitted = fit_lengths(prompt, answers, ["response"] * len(answers), tokenizer, max_length,
                         max_prompt_length)
    if not isinstance(fitted, tuple):
        return fitted
    prompt, answers, truncated = fitted
    out: dict = {"num_responses": len(answers), "truncated": truncated}
    for index, answer in enumerate(answers):
        out[f"response{index}_input_ids"] = [t.id for t in prompt + answer]
        out[f"response{index}_labels"] = [IGNORE_INDEX] * len(prompt) + [t.id for t in answer]
    return out


def build_ranked_dataset(rows, tokenizer: Any, template: str, max_length: int,
                         max_prompt_length: int | None, source: str) -> tuple[LazyExamples, DropReport]:
    """Tokenized ranked examples (plus the `prompt` text, `responses` and `scores`) and a report."""
    _check_lengths(max_length, max_prompt_length)
    template_obj = get_template(template)

    def make(row: dict, where: str) -> dict | Drop:
        ranked = to_ranked(row, where, template_obj.keeps_text)
        if not isinstance(ranked, tuple):
            return ranked
        conversation, responses, scores = ranked
        result = with_location(where, tokenize_ranked, conversation, responses, tokenizer, template_obj,
                               max_length, max_prompt_length)
        if not isinstance(result, dict):
            return result
        return {**result, "prompt": prompt_text(conversation), "responses": responses, "scores": scores}

    report = DropReport(total=len(rows))
    examples = LazyExamples.build(rows, source, make, report)
    return examples, _finish(report, examples, source)


def response_rows(example: dict) -> list[dict]:
    """The example's K responses as SFT-style `{"input_ids", "labels"}` rows."""
    return [{"input_ids": example[f"response{i}_input_ids"], "labels": example[f"response{i}_labels"]}
            for i in range(example["num_responses"])]


def pad_ranked(examples: list[dict], pad_token_id: int | None) -> dict:
    """Every response of every example as one right-padded batch [N, T] (N = Σ K), with
    `scores` [N] (float32), `groups` [N] (which example each row answers) and `num_prompts`."""
    batch = pad_batch([row for e in examples for row in response_rows(e)], pad_token_id)
    batch["scores"] = torch.tensor([s for e in examples for s in e["scores"]], dtype=torch.float32)
    batch["groups"] = torch.tensor([g for g, e in enumerate(examples) for _ in range(e["num_responses"])])
    batch["num_prompts"] = len(examples)
    return batch

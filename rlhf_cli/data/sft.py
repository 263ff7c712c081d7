"""SFT rows -> conversations -> token ids and labels, with truncation and counted drops.

Truncation policy (see `tokenize_conversation`): the prompt is everything before the first
assistant token. It is cut from the left to `max_prompt_length`, always keeping BOS and the
template's closing marker; then the rest is cut from the right to fit `max_length`, always ending
on an EOS that carries loss. Rows that cannot fit are dropped and counted by `DropReason`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from rlhf_cli.data.lazy import LazyExamples, with_location
from rlhf_cli.data.templates import (
    ROLES,
    Template,
    Token,
    encode_segments,
    get_template,
)
from rlhf_cli.errors import UserError

IGNORE_INDEX = -100  # label value that transformers' loss skips
FORMATS = ("'messages' (a list of {role, content}), 'instruction' + 'output' (+ optional "
           "'input'), or 'prompt' + 'response'")


class DropReason(Enum):
    EMPTY_RESPONSE = "empty response"
    MARKER_TOO_LONG = "prompt template markers alone fill max_prompt_length"
    NO_ROOM = "prompt leaves no room for the response within max_length"


@dataclass
class DropReport:
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # DropReason -> count
    truncated: Counter = field(default_factory=Counter)  # "prompt" / "response" -> count

    def summary(self) -> str:
        if self.dropped:
            reasons = ", ".join(f"{n} {r.value}" for r, n in self.dropped.most_common())
            text = f"dropped {self.total - self.kept} of {self.total} rows: {reasons}"
        else:
            text = f"kept all {self.total} rows"
        if self.truncated:
            parts = ", ".join(f"{n} {part}s" for part, n in sorted(self.truncated.items()))
            text += f"; truncated {parts}"
        return text


# ---------------------------------------------------------------- rows -> conversations


def to_conversation(row: dict, where: str) -> list[dict]:
    """Normalise an Alpaca, prompt/response or messages row to `[{"role", "content"}, ...]`.

    An Alpaca `input` stays a separate `input` key on the user turn: the alpaca template has its
    own "### Input:" slot, the other templates append it to the instruction. Turns after the last
    assistant turn are removed: they carry no loss and would only push the final EOS away.
    """
    if "messages" in row:
        conversation = _from_messages(row["messages"], where)
    elif "instruction" in row and "output" in row:
        user = {"role": "user", "content": _text(row, "instruction", where),
                "input": _text(row, "input", where, optional=True)}
        conversation = [user, {"role": "assistant", "content": _text(row, "output", where)}]
    elif "prompt" in row and "response" in row:
        conversation = [{"role": "user", "content": _text(row, "prompt", where)},
                        {"role": "assistant", "content": _text(row, "response", where)}]
    else:
        raise UserError(f"expected fields {FORMATS}; this row has: "
                        f"{', '.join(map(repr, row)) or 'no fields'}", where=where)
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[: last + 1]


def _text(row: dict, key: str, where: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    # Only strings (and numbers, e.g. a numeric answer): a list `output` must never be indexed
    # or joined silently, and `str(list)` would train on its repr.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"field {key!r} must be a string, got {type(value).__name__}", where=where)
    return str(value)


def messages_of(value: Any, key: str, where: str) -> list[dict]:
    """A validated non-empty list of `{"role", "content"}` (content None counts as "")."""
    if not isinstance(value, list) or not value:
        raise UserError(f"'{key}' must be a non-empty list of {{role, content}}", where=where)
    out = []
    for i, message in enumerate(value):
        spot = f"{where} {key}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError("each message needs 'role' and 'content'", where=spot)
        if message["role"] not in ROLES:
            raise UserError(f"unknown role {message['role']!r}; expected one of "
                            f"{', '.join(ROLES)}", where=spot)
        # content None is how OpenAI-style data writes an assistant turn with only tool calls
        out.append({"role": message["role"],
                    "content": _text(message, "content", spot, optional=True)})
    return out


def _from_messages(messages: Any, where: str) -> list[dict]:
    conversation = messages_of(messages, "messages", where)
    roles = [m["role"] for m in conversation]
    if "assistant" not in roles:
        raise UserError("'messages' has no assistant turn to train on", where=where)
    if roles[0] == "assistant":
        raise UserError("'messages' starts with an assistant turn; it needs a system or user "
                        "turn before it", where=where)
    return conversation


# ---------------------------------------------------------------- conversations -> tokens


def tokenize_conversation(conversation: list[dict], tokenizer: Any, template: Template | str,
                          max_length: int, max_prompt_length: int | None = None
                          ) -> dict | DropReason:
    """`{"input_ids", "labels", "truncated"}` for one conversation, or why it was dropped.

    labels == input_ids on assistant tokens (content, end marker, EOS), -100 elsewhere; the model
    shifts them itself. "truncated" lists the parts that were cut ("prompt", "response").
    """
    if isinstance(template, str):
        template = get_template(template)
    if not any(m["content"].strip() for m in conversation if m["role"] == "assistant"):
        return DropReason.EMPTY_RESPONSE
    tokens = encode_segments(template.render(conversation, tokenizer), tokenizer)
    last = max(i for i, t in enumerate(tokens) if t.train)
    tokens = tokens[: last + 1]  # the sequence ends on the final EOS
    first = next(i for i, t in enumerate(tokens) if t.train)
    prompt, response = tokens[:first], tokens[first:]
    fitted = fit_lengths(prompt, [response], ["response"], tokenizer, max_length, max_prompt_length)
    if isinstance(fitted, DropReason):
        return fitted
    prompt, (response,), truncated = fitted
    tokens = prompt + response
    return {"input_ids": [t.id for t in tokens],
            "labels": [t.id if t.train else IGNORE_INDEX for t in tokens],
            "truncated": truncated}


def truncate_prompt(prompt: list[Token], limit: int, bos_id: int | None) -> list[Token] | None:
    """Cut the prompt from the left, keeping BOS and the closing marker; None if they fill it."""
    head = prompt[:1] if bos_id is not None and prompt and prompt[0].id == bos_id else []
    marker_start = len(prompt)
    while marker_start > len(head) and prompt[marker_start - 1].marker:
        marker_start -= 1
    room = limit - len(head) - (len(prompt) - marker_start)
    if room < 1:  # nothing of the actual prompt would be left
        return None
    return head + prompt[marker_start - room:]


def _truncate_response(response: list[Token], budget: int, eos_id: int) -> list[Token] | None:
    """Cut from the right to `budget` tokens, ending on a trained EOS; None if nothing fits."""
    if budget < 2:  # at least one response token and the EOS
        return None
    cut = response[:budget]
    if not cut[-1].train:
        # The cut fell inside a later user turn: end at the previous assistant turn instead
        # (its last trained token is its EOS).
        cut = cut[: max(i for i, t in enumerate(cut) if t.train) + 1]
    # The cut fell inside an assistant turn: its last kept token becomes the EOS.
    cut[-1] = Token(eos_id, True, False)
    return cut


def fit_lengths(prompt: list[Token], responses: list[list[Token]], names: list[str], tokenizer: Any,
                max_length: int, max_prompt_length: int | None) -> tuple | DropReason:
    """SFT's truncation of a prompt and the answers that follow it (one for SFT, two for a
    pair): (prompt, answers, names of the cut parts), or why the row cannot fit."""
    truncated = []
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = truncate_prompt(prompt, max_prompt_length, tokenizer.bos_token_id)
        if prompt is None:
            return DropReason.MARKER_TOO_LONG
        truncated.append("prompt")
    fitted = []
    for name, response in zip(names, responses, strict=True):
        if len(prompt) + len(response) > max_length:
            response = _truncate_response(response, max_length - len(prompt),
                                          tokenizer.eos_token_id)
            if response is None:
                return DropReason.NO_ROOM
            truncated.append(name)
        fitted.append(response)
    return prompt, fitted, truncated


def build_sft_dataset(rows: list[dict], tokenizer: Any, template: str, max_length: int,
                      max_prompt_length: int | None, source: str
                      ) -> tuple[LazyExamples, DropReport]:
    """Tokenized `{"input_ids", "labels"}` examples for every row that fits, and a DropReport.

    The examples are tokenized when read (see `lazy.py`); this call reads every row once to
    count the drops and find the errors.
    """
    _check_lengths(max_length, max_prompt_length)
    chosen = get_template(template)

    def make(row: dict, where: str) -> dict | DropReason:
        conversation = to_conversation(row, where)
        return with_location(where, tokenize_conversation, conversation, tokenizer, chosen,
                             max_length, max_prompt_length)

    report = DropReport(total=len(rows))
    examples = LazyExamples.build(rows, source, make, report)
    if not examples:
        raise UserError(f"every row of {source} was dropped ({report.summary()}); raise "
                        "max_length or max_prompt_length, or check the data")
    return examples, report


def _labels_on_every_token(example: dict) -> dict:
    return {**example, "labels": list(example["input_ids"])}


def loss_on_every_token(examples: Sequence[dict]) -> Sequence[dict]:
    """`sft.completion_only: false`: labels on the prompt too (plain causal-LM fine-tuning).

    Shared by training and `rlhf preview`, so that the preview shows the loss that is trained.
    Lazily tokenized examples stay lazy.
    """
    if isinstance(examples, LazyExamples):
        return examples.map(_labels_on_every_token)
    return [_labels_on_every_token(e) for e in examples]


def _check_lengths(max_length: int, max_prompt_length: int | None) -> None:
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and not 1 <= max_prompt_length <= max_length - 2:
        raise UserError(f"max_prompt_length must be between 1 and max_length - 2 "
                        f"({max_length - 2}) so that a response fits, got {max_prompt_length}")

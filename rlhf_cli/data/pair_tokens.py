"""A prompt conversation followed by one or more answers, as tokens: each answer encoded after
the prompt as one text (as at inference), the prompt they all share token for token, and
SFT's truncation applied to that shared prompt and each answer.

Preference pairs (two answers, preference.py) and KTO's unpaired completions (one answer,
unpaired.py) are both built from these.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rlhf_cli.data.templates import Template, Token, encode_segments, render_prompt
from rlhf_cli.errors import UserError


def encode_answers(conversation: list[dict], answers: list[str], tokenizer: Any,
                  template: Template) -> list[list[Token]]:
    prompt_segments = render_prompt(template, conversation, tokenizer)
    return [encode_answer(conversation, a, prompt_segments, tokenizer, template) for a in answers]


def encode_answer(conversation: list[dict], answer: str, prompt_segments: list, tokenizer: Any,
                 template: Template) -> list[Token]:
    """Tokens of prompt + answer, encoded as one text (as at inference), loss on the answer only."""
    segments = template.render([*conversation, {"role": "assistant", "content": answer}], tokenizer)
    n = len(prompt_segments)
    if segments[:n] != prompt_segments:
        raise UserError(f"template {template.name!r} renders the prompt differently once an "
                        "answer follows, so the answer cannot be located; use another template")
    context = [replace(s, train=False) for s in segments[:n]]
    tokens = encode_segments(context + segments[n:], tokenizer)
    return tokens[: max(i for i, t in enumerate(tokens) if t.train) + 1]


def shared_prompt(*sides: list[Token]) -> tuple[list[Token], list[list[Token]]]:
    """The prompt every side (chosen and rejected, or K ranked answers) starts with, and the
    rest of each side (all trained).

    Normally the prompt is everything before the first trained token, the same on every side. A
    tokenizer may merge the marker's last characters with an answer's first ones (a "\\n\\n"
    token); then the prompt is the common token prefix and the differing tokens are scored as
    part of the answers, so every side is conditioned on exactly the same ids.
    """
    firsts = [next(i for i, t in enumerate(side) if t.train) for side in sides]
    shared = 0
    while shared < min(firsts) and all(side[shared].id == sides[0][shared].id for side in sides):
        shared += 1
    rests = [[t._replace(train=True) for t in side[shared:first]] + side[first:]
             for side, first in zip(sides, firsts, strict=True)]
    return sides[0][:shared], rests

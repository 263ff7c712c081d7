"""Prompt token ids for generation: the conversation so far plus the assistant's opening."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .sft import truncate_prompt
from .templates import encode_segments, get_template, render_prompt


def prompt_ids_for_generation(conversation: list[dict], tokenizer: Any, template: str,
                              max_prompt_length: int | None) -> list[int]:
    """BOS + prompt + closing marker, cut from the left to `max_prompt_length` if needed."""
    tokens = encode_segments(render_prompt(get_template(template), conversation, tokenizer),
                             tokenizer)
    if max_prompt_length is not None and len(tokens) > max_prompt_length:
        tokens = truncate_prompt(tokens, max_prompt_length, tokenizer.bos_token_id)
        if tokens is None:
            raise UserError(f"max_prompt_length {max_prompt_length} leaves no room for the "
                            "prompt after the template's markers")
    return [t.id for t in tokens]

"""PPO prompts: rows -> the conversation to answer -> prompt token ids for generation.

Accepted rows: `prompt` (a string, or a list of messages), `instruction` (+ `input`), `messages`
(the prompt is every message up to and including the last user turn; later assistant and tool
turns are dropped), or a preference row whose prompt can be parsed (e.g. Anthropic HH
transcripts), so the same file can feed RM/DPO and PPO.

Prompts longer than `max_prompt_length` are dropped and counted, not truncated: a PPO prompt cut
from the left loses the start of the question, yet the reward function and the logs see the
whole prompt text, so the policy would be scored on answering something it never saw. Dropping
keeps the prompt the policy sees and the prompt it is scored on the same.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from rlhf_cli.data.lazy import LazyExamples
from rlhf_cli.data.preference import FORMATS as PREFERENCE_FORMATS
from rlhf_cli.data.preference import (
    PairDrop,
    messages_of,
    parse_pair,
    prompt_text,
    prompt_turns,
    with_location,
)
from rlhf_cli.data.prompts import prompt_ids_for_generation
from rlhf_cli.data.sft import DropReport
from rlhf_cli.data.templates import get_template
from rlhf_cli.errors import UserError

FORMATS = ("'prompt' (a string or a list of messages), 'instruction' (+ optional 'input'), "
           f"'messages', or preference data: {PREFERENCE_FORMATS}")


class PromptDrop(Enum):
    TOO_LONG = "prompt longer than max_prompt_length"


def to_prompt(row: dict, where: str, keep_text: bool = False) -> list[dict] | PairDrop:
    """The conversation to generate the next assistant turn for, or why the row is skipped.

    `keep_text` (the template's `keeps_text`): HH transcripts keep their exact text.
    """
    if "messages" in row and "chosen" not in row:
        return _up_to_last_user(messages_of(row["messages"], "messages", where), where)
    if "prompt" in row or "instruction" in row:
        turns = prompt_turns(row, where)
        return _up_to_last_user(turns, where) if isinstance(row.get("prompt"), list) else turns
    if "chosen" in row or "output" in row:
        pair = parse_pair(row, where, keep_text)  # the prompt of a pair, whatever its responses
        return pair[0] if isinstance(pair, tuple) else pair
    raise UserError(f"expected fields {FORMATS}; this row has: "
                    f"{', '.join(map(repr, row)) or 'no fields'}", where=where)


def _up_to_last_user(messages: list[dict], where: str) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise UserError("the messages have no user turn to answer", where=where)
    return messages[: last + 1]


def build_prompt_dataset(rows: list[dict], tokenizer: Any, template: str,
                         max_prompt_length: int | None, source: str
                         ) -> tuple[LazyExamples, DropReport]:
    """`{"prompt", "prompt_input_ids"}` per usable row, and a DropReport.

    `prompt` is the text of the last user turn (what a reward function is called with), or the
    whole dialogue of an HH transcript kept verbatim (`plain`, see `prompt_text`);
    `prompt_input_ids` are BOS + the rendered conversation + the template's closing marker.
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    keep_text = get_template(template).keeps_text  # an unknown name fails before any row is read

    def make(row: dict, where: str) -> dict | PairDrop | PromptDrop:
        conversation = to_prompt(row, where, keep_text)
        if not isinstance(conversation, list):
            return conversation
        ids = with_location(where, prompt_ids_for_generation, conversation, tokenizer, template, None)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            return PromptDrop.TOO_LONG
        return {"prompt": prompt_text(conversation), "prompt_input_ids": ids}

    report = DropReport(total=len(rows))
    examples = LazyExamples.build(rows, source, make, report)
    if not examples:
        raise UserError(f"every row of {source} was dropped ({report.summary()}); check the "
                        "data format, or raise max_prompt_length")
    return examples, report

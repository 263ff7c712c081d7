"""Preference rows -> (prompt conversation, chosen, rejected) -> token ids and labels, per side.

Accepted rows (checked in this order):
- `chosen` + `rejected` with `prompt` (a string or a list of messages) or `instruction` (+ `input`).
  `chosen`/`rejected` are strings, or message lists whose last message is the assistant answer;
  when those lists carry earlier turns (`[user, assistant]`), they are the prompt and must match.
- `chosen` + `rejected` as full message lists sharing every turn but the last (chat pairs).
- `chosen` + `rejected` strings and nothing else: Anthropic HH transcripts (see `data/hh.py`;
  under `plain` they keep their exact text).
- the older `output: [chosen, rejected]` with `instruction` (+ `input`) or `prompt`.

Bad input is either an error or a counted skip. A row whose shape is wrong (no recognisable
fields, a string `output`, a message without a role) raises a `UserError` naming the row: its
other rows are probably wrong too. A row that is shaped right but unusable as a pair (`rejected`
null or absent, an empty or identical response, HH texts that share no prompt, a prompt the
lengths cannot fit) is skipped and counted by reason in the `DropReport`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from rlhf_cli.data.hh import hh_conversation, hh_split, is_verbatim, transcript_prompt
from rlhf_cli.data.lazy import LazyExamples, with_location
from rlhf_cli.data.pair_tokens import encode_answers, shared_prompt
from rlhf_cli.data.sft import (
    IGNORE_INDEX,
    DropReason,
    DropReport,
    _check_lengths,
    _text,
    fit_lengths,
    messages_of,
)
from rlhf_cli.data.templates import (
    ASSISTANT,
    HUMAN,  # noqa: F401 (re-exported: callers read the HH markers here)
    Template,
    get_template,
    user_text,
)
from rlhf_cli.errors import UserError

FORMATS = ("'prompt' (or 'instruction' + optional 'input') + 'chosen' + 'rejected', 'chosen' + "
           "'rejected' as message lists or Anthropic HH transcripts, or 'instruction'/'prompt' + "
           "'output': [chosen, rejected]")


class PairDrop(Enum):
    """Reasons a preference row is skipped, besides sft's EMPTY_RESPONSE/MARKER_TOO_LONG/NO_ROOM."""

    MISSING = "chosen or rejected missing"
    IDENTICAL = "chosen and rejected identical"
    NO_SHARED_PROMPT = "chosen and rejected share no prompt"


Drop = DropReason | PairDrop


# ---------------------------------------------------------------- Anthropic HH transcripts


def _from_hh(chosen: str, rejected: str, where: str, keep_text: bool
             ) -> tuple[list[dict], str, str] | PairDrop:
    if ASSISTANT not in chosen and ASSISTANT not in rejected:
        raise UserError("'chosen' and 'rejected' without a 'prompt' must be Anthropic HH "
                        "transcripts ('\\n\\nHuman: ... \\n\\nAssistant: ...'); expected "
                        f"{FORMATS}", where=where)
    split = hh_split(chosen, rejected)
    conversation = hh_conversation(split[0], keep_text) if split else []
    if not any(m["role"] == "user" for m in conversation):
        return PairDrop.NO_SHARED_PROMPT
    if keep_text:  # the responses as written, so that prompt + response is the transcript
        return conversation, split[1], split[2]
    return conversation, split[1].strip(), split[2].strip()


# ---------------------------------------------------------------- rows -> pairs


def to_preference(row: dict, where: str, keep_text: bool = False
                  ) -> tuple[list[dict], str, str] | Drop:
    """(prompt conversation, chosen text, rejected text) of one row, or why it is skipped.

    `keep_text` (the template's `keeps_text`): HH transcripts keep their exact text.
    """
    pair = parse_pair(row, where, keep_text)
    if isinstance(pair, PairDrop):
        return pair
    if not pair[1].strip() or not pair[2].strip():
        return DropReason.EMPTY_RESPONSE
    return PairDrop.IDENTICAL if pair[1] == pair[2] else pair


def parse_pair(row: dict, where: str, keep_text: bool = False
               ) -> tuple[list[dict], str, str] | PairDrop:
    """Like `to_preference`, but without judging the responses (PPO prompts use this)."""
    if "chosen" in row:
        chosen, rejected = row["chosen"], row.get("rejected")
    elif "output" in row:
        chosen, rejected = _output_pair(row["output"], where)
    else:
        raise UserError(f"expected fields {FORMATS}; this row has: "
                        f"{', '.join(map(repr, row)) or 'no fields'}", where=where)
    if chosen is None or rejected is None:
        return PairDrop.MISSING
    has_prompt = "prompt" in row or "instruction" in row
    if not has_prompt and isinstance(chosen, str) and isinstance(rejected, str):
        return _from_hh(chosen, rejected, where, keep_text)
    chosen_turns, chosen = _response(chosen, "chosen", where)
    rejected_turns, rejected = _response(rejected, "rejected", where)
    if chosen_turns != rejected_turns:
        return PairDrop.NO_SHARED_PROMPT
    conversation = chosen_turns or (prompt_turns(row, where) if has_prompt else None)
    if not conversation:
        raise UserError("no prompt: give 'prompt' (or 'instruction'), or put the prompt turns "
                        "in the 'chosen'/'rejected' message lists", where=where)
    return conversation, chosen, rejected


def _output_pair(output: Any, where: str) -> tuple[Any, Any]:
    # A string `output` is an SFT answer: indexing it would make "P" and "a" a "pair".
    if not isinstance(output, list):
        raise UserError(f"'output' must be a list [chosen, rejected], got {type(output).__name__} "
                        "(a single answer is SFT data, not a preference pair)", where=where)
    if len(output) > 2:
        raise UserError(f"'output' must be [chosen, rejected], got {len(output)} items",
                        where=where)
    padded = [*output, None, None]
    return padded[0], padded[1]


def prompt_turns(row: dict, where: str) -> list[dict]:
    if "instruction" in row:
        return [{"role": "user", "content": _text(row, "instruction", where),
                 "input": _text(row, "input", where, optional=True)}]
    if isinstance(row["prompt"], list):
        return messages_of(row["prompt"], "prompt", where)
    return [{"role": "user", "content": _text(row, "prompt", where)}]


def _response(value: Any, key: str, where: str) -> tuple[list[dict], str]:
    """(earlier turns, answer text) of a `chosen`/`rejected` string, message or message list."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [], _text({key: value}, key, where)
    messages = messages_of(value, key, where)
    if messages[-1]["role"] != "assistant":
        raise UserError(f"the last message of '{key}' must be the assistant's answer, got role "
                        f"{messages[-1]['role']!r}", where=where)
    return messages[:-1], messages[-1]["content"]


def prompt_text(conversation: list[dict]) -> str:
    """The text of the last user turn (with an Alpaca input): what prompts are shown/scored as.

    A transcript kept verbatim is shown whole, as the dialogue up to its last "\\n\\nAssistant:".
    """
    if is_verbatim(conversation):
        return transcript_prompt(conversation)
    users = [m for m in conversation if m["role"] == "user"]
    return user_text(users[-1]) if users else user_text(conversation[-1])


# ---------------------------------------------------------------- pairs -> tokens


def tokenize_pair(prompt_conversation: list[dict], chosen: str, rejected: str, tokenizer: Any,
                  template: Template | str, max_length: int, max_prompt_length: int | None = None
                  ) -> dict | Drop:
    """`{chosen,rejected}_{input_ids,labels}` (+ "truncated") for one pair, or why it is dropped.

    Both sides share one prompt, token for token: BOS, the conversation, the closing marker
    (earlier assistant turns are context here, without loss). Labels are -100 on the prompt and
    the ids on the answer and its EOS. Truncation as in SFT: the shared prompt is cut once from
    the left to `max_prompt_length` (keeping BOS and the marker), then each response from the
    right to fit `max_length` (ending on a trained EOS).
    """
    if isinstance(template, str):
        template = get_template(template)
    if not chosen.strip() or not rejected.strip():
        return DropReason.EMPTY_RESPONSE
    sides = encode_answers(prompt_conversation, [chosen, rejected], tokenizer, template)
    prompt, responses = shared_prompt(*sides)
    fitted = fit_lengths(prompt, responses, ["chosen response", "rejected response"], tokenizer,
                  max_length, max_prompt_length)
    if not isinstance(fitted, tuple):
        return fitted
    prompt, responses, truncated = fitted
    out: dict = {}
    for side, response in zip(("chosen", "rejected"), responses, strict=True):
        out[f"{side}_input_ids"] = [t.id for t in prompt + response]
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + [t.id for t in response]
    if out["chosen_input_ids"] == out["rejected_input_ids"]:  # e.g. both cut to the same prefix
        return PairDrop.IDENTICAL
    out["truncated"] = truncated
    return out


# ---------------------------------------------------------------- datasets


def build_preference_dataset(rows: list[dict], tokenizer: Any, template: str, max_length: int,
                             max_prompt_length: int | None, source: str
                             ) -> tuple[LazyExamples, DropReport]:
    """Tokenized pairs (plus their `prompt`/`chosen`/`rejected` texts) and a DropReport.

    The pairs are tokenized when read (see `lazy.py`); this call reads every row once to count
    the drops and find the errors.
    """
    _check_lengths(max_length, max_prompt_length)
    template_obj = get_template(template)  # an unknown name fails before any row is read

    def make(row: dict, where: str) -> dict | Drop:
        pair = to_preference(row, where, template_obj.keeps_text)
        if not isinstance(pair, tuple):
            return pair
        conversation, chosen, rejected = pair
        result = with_location(where, tokenize_pair, conversation, chosen, rejected, tokenizer,
                               template_obj, max_length, max_prompt_length)
        if not isinstance(result, dict):
            return result
        return {**result, "prompt": prompt_text(conversation), "chosen": chosen,
                "rejected": rejected}

    report = DropReport(total=len(rows))
    examples = LazyExamples.build(rows, source, make, report)
    return examples, _finish(report, examples, source)


def _finish(report: DropReport, examples, source: str) -> DropReport:
    report.kept = len(examples)
    if not examples:
        raise UserError(f"every row of {source} was dropped ({report.summary()}); check the "
                        "data format, or raise max_length or max_prompt_length")
    return report

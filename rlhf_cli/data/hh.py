"""Anthropic HH transcripts ("\\n\\nHuman: … \\n\\nAssistant: …"): the shared prompt and the turns."""

from __future__ import annotations

import os
import re

from rlhf_cli.data.templates import ASSISTANT, HUMAN

_HH_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def hh_split(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of two HH transcripts, or None.

    The prompt is the longest common prefix of the two texts that ends with "\\n\\nAssistant:";
    deriving it from both (not from the last "Assistant:" of one) copes with rows where one side
    has extra turns. Exact: `prompt + chosen_response == chosen`, likewise for rejected.
    """
    end = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
    if end < 0:
        return None
    end += len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def hh_conversation(prompt: str, keep_text: bool = False) -> list[dict]:
    """An HH prompt ("\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant:") as user/assistant turns.

    Contents are stripped (templates add their own separators); the closing "Assistant:" with
    nothing after it is the cue for the answer, not a turn. Text before the first marker, which
    real transcripts never have, is kept as a user turn rather than lost. With `keep_text`, each
    turn also carries its exact source text, label included, as "verbatim" (for `plain`).
    """
    parts = _HH_TURN.split(prompt)
    conversation = []
    if parts[0].strip():
        conversation.append(_turn("user", parts[0], parts[0], keep_text))
    for marker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if marker == HUMAN else "assistant"
        conversation.append(_turn(role, content, marker + content, keep_text))
    if conversation and conversation[-1]["role"] == "assistant" and not conversation[-1]["content"]:
        conversation.pop()
    return conversation


def _turn(role: str, content: str, source: str, keep_text: bool) -> dict:
    turn = {"role": role, "content": content.strip()}
    return {**turn, "verbatim": source} if keep_text else turn


def is_verbatim(conversation: list[dict]) -> bool:
    """Turns parsed with `keep_text`: the transcript's own text is what prompts are shown as."""
    return bool(conversation) and all("verbatim" in m for m in conversation)


def transcript_prompt(conversation: list[dict]) -> str:
    """The HH prompt a verbatim conversation was parsed from, up to its last "\\n\\nAssistant:"."""
    return "".join(m["verbatim"] for m in conversation) + ASSISTANT

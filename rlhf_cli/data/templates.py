"""Prompt templates: a conversation rendered as text segments tagged with where the loss goes.

A template turns `[{"role", "content"}, ...]` into `Segment`s: plain text (trained or not), the
prompt's closing marker (e.g. "### Response:\n", which truncation must keep), and the BOS/EOS
special tokens, which are emitted as the tokenizer's real ids rather than as text so that a
"</s>" typed in the data can never stand in for them. `encode_segments` tokenizes the segments
and keeps the tags per token.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

from rlhf_cli.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
# `plain` labels the turns of a dialogue the way Anthropic HH transcripts do
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
PLAIN_LABELS = {"system": "\n\nSystem:", "user": HUMAN, "assistant": ASSISTANT, "tool": "\n\nTool:"}


@dataclass(frozen=True)
class Segment:
    text: str = ""
    train: bool = False  # carries loss: assistant content, its end marker, its EOS
    marker: bool = False  # the prompt's closing marker: prompt truncation never cuts it
    special: str | None = None  # "bos" or "eos": the tokenizer's id, not text


BOS = Segment(special="bos")
EOS = Segment(train=True, special="eos")


class Token(NamedTuple):
    id: int
    train: bool
    marker: bool


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    render_fn: Callable[[list[dict], Any], list[Segment]]
    # renders a message's "verbatim" source text as it is (HH transcripts under `plain`)
    keeps_text: bool = False

    def render(self, conversation: list[dict], tokenizer: Any = None) -> list[Segment]:
        return self.render_fn(conversation, tokenizer)


def user_text(message: dict) -> str:
    """A message's text; an Alpaca `input` is appended where a template has no slot for it."""
    extra = message.get("input") or ""
    return f"{message['content']}\n\n{extra}" if extra else message["content"]


def _plain(conversation: list[dict], tokenizer: Any) -> list[Segment]:
    """One exchange joined as it is; a dialogue with role labels (see `_plain_dialogue`)."""
    if is_dialogue(conversation):
        return _plain_dialogue(conversation)
    segments = [BOS]
    for message in conversation:
        if message["role"] == "assistant":
            segments += [Segment(message["content"], train=True), EOS]
        else:
            segments.append(Segment(user_text(message)))
    return segments


def is_dialogue(conversation: list[dict]) -> bool:
    """More than one user message and one answer (a system or tool turn, a second exchange), or
    a transcript kept verbatim: joined without labels, its turns could not be told apart."""
    roles = [m["role"] for m in conversation]
    answers = roles.count("assistant")
    return answers > 1 or len(roles) - answers > 1 or any("verbatim" in m for m in conversation)


def _plain_dialogue(conversation: list[dict]) -> list[Segment]:
    # HH's own layout: "\n\nHuman: …\n\nAssistant: …", the "\n\nAssistant:" before each answer
    # being the marker. Messages parsed from a transcript carry their exact source text
    # ("verbatim", label included) and answers to them are kept as they are (their leading space
    # included), so that prompt + answer rebuilds the transcript character for character.
    verbatim = any("verbatim" in m for m in conversation)
    segments = [BOS]
    for message in conversation:
        role = message["role"]
        if "verbatim" in message:
            segments.append(Segment(message["verbatim"]))
        elif role == "assistant":
            answer = message["content"] if verbatim else f" {message['content']}"
            segments += [Segment(ASSISTANT, marker=True), Segment(answer, train=True), EOS]
        else:
            segments.append(Segment(f"{PLAIN_LABELS[role]} {user_text(message)}"))
    return segments


_ALPACA_INTRO = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
_ALPACA_INTRO_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. "
                       "Write a response that appropriately completes the request.\n\n")


def _alpaca(conversation: list[dict], tokenizer: Any) -> list[Segment]:
    has_input = any(m.get("input") or m["role"] == "tool" for m in conversation)
    segments = [BOS]
    if conversation[0]["role"] != "system":  # a system message replaces the stock preamble
        segments.append(Segment(_ALPACA_INTRO_INPUT if has_input else _ALPACA_INTRO))
    for message in conversation:
        role, content = message["role"], message["content"]
        if role == "system":
            segments.append(Segment(f"{content}\n\n"))
        elif role == "user":
            text = f"### Instruction:\n{content}\n\n"
            if message.get("input"):
                text += f"### Input:\n{message['input']}\n\n"
            segments.append(Segment(text))
        elif role == "tool":
            segments.append(Segment(f"### Input:\n{content}\n\n"))
        else:
            # the "\n\n" separates a following turn; after the last turn it is trimmed away
            segments += [Segment("### Response:\n", marker=True),
                         Segment(content, train=True), EOS, Segment("\n\n")]
    return segments


def _llama2(conversation: list[dict], tokenizer: Any) -> list[Segment]:
    # Meta's chat_completion: each exchange is
    #   BOS "[INST] {user} [/INST] {answer} " EOS
    # with the system prompt folded into the first user message and contents stripped.
    # Non-assistant messages between two answers are joined into one [INST] block.
    segments: list[Segment] = []
    pending: list[str] = []
    for message in conversation:
        role, content = message["role"], user_text(message).strip()
        if role == "system":
            pending.append(f"<<SYS>>\n{content}\n<</SYS>>")
        elif role != "assistant":
            pending.append(content)
        else:
            prompt = _join_llama2(pending)
            segments += [BOS, Segment(f"[INST] {prompt}"), Segment(" [/INST]", marker=True),
                         Segment(f" {content} ", train=True), EOS]
            pending = []
    return segments


def _join_llama2(parts: list[str]) -> str:
    # Meta puts "\n\n" after <</SYS>>; other parts are separated by a blank line as well
    return "\n\n".join(parts)


def _chatml(conversation: list[dict], tokenizer: Any) -> list[Segment]:
    segments = [BOS]
    for message in conversation:
        role = message["role"]
        if role == "assistant":
            segments += [Segment("<|im_start|>assistant\n", marker=True),
                         Segment(f"{message['content']}<|im_end|>", train=True), EOS,
                         Segment("\n")]
        else:
            segments.append(Segment(f"<|im_start|>{role}\n{user_text(message)}<|im_end|>\n"))
    return segments


def _from_chat_template(conversation: list[dict], tokenizer: Any) -> list[Segment]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        others = ", ".join(n for n in TEMPLATES if n != "tokenizer")
        raise UserError("template 'tokenizer' needs a tokenizer with a chat_template, and this "
                        f"one has none; use one of: {others}")
    messages = [{"role": m["role"], "content": user_text(m)} for m in conversation]
    full = _render_chat(tokenizer, messages, generation_prompt=False)
    segments, pos = [BOS], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_chat(tokenizer, messages[:i], generation_prompt=True)
        turn = _render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (turn.startswith(prompt) and full.startswith(turn) and pos <= len(prompt)):
            # e.g. templates that drop the reasoning of earlier turns: the loss positions of a
            # turn cannot be located in the full rendering
            raise UserError("the tokenizer's chat_template renders earlier turns differently from "
                            "later ones, so assistant turns cannot be located; use template "
                            "chatml, llama2, alpaca or plain")
        end = len(turn.rstrip())  # trailing newlines after the end-of-turn marker carry no loss
        body, marker = _split_marker(full[pos:len(prompt)], messages[i - 1]["content"])
        segments += [Segment(body), Segment(marker, marker=True),
                     Segment(full[len(prompt):end], train=True), EOS]
        pos = end
    segments.append(Segment(full[pos:]))
    bos_text = getattr(tokenizer, "bos_token", None)
    if bos_text and segments[1].text.startswith(bos_text):  # the template writes BOS itself
        segments[1] = Segment(segments[1].text[len(bos_text):])
    return segments


def _render_chat(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises TemplateError / exceptions the template raises
        raise UserError(f"the tokenizer's chat_template failed on this row: {exc}") from exc


def _split_marker(prompt: str, last_content: str) -> tuple[str, str]:
    """Split a rendered prompt after the last message's content: what follows is the marker."""
    for needle in (last_content, last_content.strip()):
        at = prompt.rfind(needle) if needle else -1
        if at >= 0:
            return prompt[: at + len(needle)], prompt[at + len(needle):]
    return prompt, ""


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("plain", "prompt and response joined as they are; dialogues with "
                 "Human:/Assistant: labels, HH transcripts kept verbatim", _plain, keeps_text=True),
        Template("alpaca", "Stanford Alpaca: ### Instruction / ### Input / ### Response", _alpaca),
        Template("llama2", "Meta Llama 2 chat: [INST] <<SYS>> ... [/INST]", _llama2),
        Template("chatml", "<|im_start|>role ... <|im_end|>", _chatml),
        Template("tokenizer", "the tokenizer's own chat_template", _from_chat_template),
    )
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def render_prompt(template: Template, conversation: list[dict], tokenizer: Any = None):
    """Segments of the prompt for generating the next assistant turn (ends with the marker)."""
    segments = template.render([*conversation, {"role": "assistant", "content": ""}], tokenizer)
    end = len(segments)
    while end and not segments[end - 1].train:  # text after the final turn
        end -= 1
    while end and segments[end - 1].train:  # the empty reply and its EOS
        end -= 1
    return segments[:end]


def encode_segments(segments: list[Segment], tokenizer: Any) -> list[Token]:
    """Token ids of `segments`, each tagged with its segment's `train` and `marker` flags."""
    # The special ids are read once: on a transformers tokenizer each read costs a lookup.
    bos_id, eos_id = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    fast = getattr(tokenizer, "is_fast", False)
    tokens: list[Token] = []
    run: list[Segment] = []
    for segment in segments:
        if segment.special is None:
            if segment.text:
                run.append(segment)
            continue
        if run:
            tokens += _encode_run(run, tokenizer, fast)
            run = []
        token_id = bos_id if segment.special == "bos" else eos_id
        if token_id is None and segment.special == "eos":
            raise UserError("the tokenizer has no eos_token; SFT needs one to teach the model to stop")
        if token_id is not None:  # a tokenizer without BOS (e.g. Qwen) simply gets none
            tokens.append(Token(token_id, segment.train, segment.marker))
    if run:
        tokens += _encode_run(run, tokenizer, fast)
    return _collapse_repeated_specials(tokens, {bos_id, eos_id} - {None})


def _encode_run(run: list[Segment], tokenizer: Any, fast: bool) -> list[Token]:
    if not fast:  # no offsets: encode segment by segment
        return [Token(i, s.train, s.marker) for s in run
                for i in tokenizer.encode(s.text, add_special_tokens=False)]
    # Encoding the run as one string gives the same tokens as inference on the rendered text;
    # each token belongs to the segment holding its first character.
    if len(run) == 1:
        (only,) = run
        ids = tokenizer(only.text, add_special_tokens=False)["input_ids"]
        return [Token(i, only.train, only.marker) for i in ids]
    text = "".join(s.text for s in run)
    starts = list(accumulate((len(s.text) for s in run[:-1]), initial=0))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owners = (run[bisect_right(starts, start) - 1] for start, _ in enc["offset_mapping"])
    return [Token(i, s.train, s.marker) for i, s in zip(enc["input_ids"], owners, strict=True)]


def _collapse_repeated_specials(tokens: list[Token], specials: set[int]) -> list[Token]:
    # "<s>" written by a chat template or "</s>" typed at the end of a response is encoded as the
    # special id too: never emit BOS BOS or EOS EOS, keep one (trained if either was).
    out: list[Token] = []
    for token in tokens:
        if out and token.id in specials and out[-1].id == token.id:
            out[-1] = out[-1]._replace(train=out[-1].train or token.train)
            continue
        out.append(token)
    return out

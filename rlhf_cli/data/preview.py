"""What the model will see and learn: decoded examples with the loss tokens marked."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from rlhf_cli.data.sft import IGNORE_INDEX


def preview_sft(examples: list[dict], tokenizer: Any, n: int) -> list[dict]:
    """The first `n` examples as `{"input_ids", "labels", "text", "loss_text"}` (for --json)."""
    out = []
    for example in examples[:n]:
        ids, labels = list(example["input_ids"]), list(example["labels"])
        trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        out.append({"input_ids": ids, "labels": labels,
                    "text": _decode(tokenizer, ids), "loss_text": _decode(tokenizer, trained)})
    return out


def render_preview_rich(examples: list[dict], tokenizer: Any, n: int):
    """A rich renderable: one panel per example, loss tokens in green, with token counts."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    panels = []
    for index, example in enumerate(examples[:n]):
        pairs = list(zip(example["input_ids"], example["labels"], strict=True))
        text = Text()
        # Decode runs of same-loss tokens together: decoding token by token would break
        # multi-byte characters and SentencePiece spacing.
        for trained, run in groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
            ids = [token_id for token_id, _ in run]
            text.append(_decode(tokenizer, ids), style="bold green" if trained else "dim")
        n_loss = sum(1 for _, label in pairs if label != IGNORE_INDEX)
        title = f"example {index + 1}: {len(pairs)} tokens, {n_loss} with loss (green)"
        panels.append(Panel(text, title=title, title_align="left"))
    return Group(*panels)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    # keep special tokens visible: a missing or doubled BOS/EOS is exactly what a preview is for
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


PAIR_FIELDS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def preview_preference(examples: list[dict], tokenizer: Any, n: int) -> list[dict]:
    """The first `n` pairs as `{"prompt", "chosen", "rejected"}` (the parsed texts) plus
    `{chosen,rejected}_{input_ids,labels}` and the decoded `chosen_text`/`rejected_text`."""
    out = []
    for example in examples[:n]:
        item = {key: example[key] for key in ("prompt", "chosen", "rejected")}
        item.update({key: list(example[key]) for key in PAIR_FIELDS})
        for side in ("chosen", "rejected"):
            item[f"{side}_text"] = _decode(tokenizer, item[f"{side}_input_ids"])
        out.append(item)
    return out


def preview_prompts(examples: list[dict], n: int) -> list[dict]:
    """The first `n` PPO prompts as `{"prompt", "prompt_input_ids"}`."""
    return [{"prompt": e["prompt"], "prompt_input_ids": list(e["prompt_input_ids"])}
            for e in examples[:n]]


def render_preference_rich(examples: list[dict], tokenizer: Any, n: int):
    """A rich renderable: one panel per pair, chosen then rejected, loss tokens in green."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    panels = []
    for index, example in enumerate(examples[:n]):
        body = Text()
        for side, style in (("chosen", "bold cyan"), ("rejected", "bold red")):
            ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
            n_loss = sum(1 for label in labels if label != IGNORE_INDEX)
            body.append(f"{side}: {len(ids)} tokens, {n_loss} with loss\n", style=style)
            body.append_text(_loss_text(tokenizer, ids, labels))
            body.append("\n\n" if side == "chosen" else "")
        panels.append(Panel(body, title=f"pair {index + 1}", title_align="left"))
    return Group(*panels)


def render_prompts_rich(examples: list[dict], tokenizer: Any, n: int):
    """A rich renderable: one panel per PPO prompt, decoded exactly as the policy will see it."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    return Group(*(Panel(Text(_decode(tokenizer, e["prompt_input_ids"])),
                         title=f"prompt {i + 1}: {len(e['prompt_input_ids'])} tokens",
                         title_align="left")
                   for i, e in enumerate(examples[:n])))


def _loss_text(tokenizer: Any, ids: list[int], labels: list[int]):
    from rich.text import Text

    text = Text()
    pairs = list(zip(ids, labels, strict=True))
    for trained, run in groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
        text.append(_decode(tokenizer, [token_id for token_id, _ in run]),
                    style="bold green" if trained else "dim")
    return text

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

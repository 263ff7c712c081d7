"""What a round keeps: SFT examples made of the sampled tokens, checkpointed, and written out.

The kept samples are trained on exactly as they were sampled: the prompt's token ids (loss
off) and the response's tokens up to and including its EOS (loss on); nothing is decoded and
re-tokenized, so the model learns the very sequences it was scored on. A response cut at
`rft.max_new_tokens` has no EOS and is trained on as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...data.sft import IGNORE_INDEX
from ...engine.run_dir import write_atomic

ROUNDS_DIR = "rounds"


def kept_example(prompt_ids: list[int], response_ids: list[int]) -> dict:
    return {"input_ids": list(prompt_ids) + list(response_ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)}


class KeptSamples:
    """The current round's kept examples: a named part of every checkpoint, so that a run
    resumed in the middle of a round trains on the samples the round kept."""

    def __init__(self):
        self.round = -1  # 0-based; -1 before the first round
        self.examples: list[dict] = []

    def set(self, round_index: int, examples: list[dict]) -> None:
        self.round, self.examples = round_index, examples

    def state_dict(self) -> dict:
        prompt_lengths = [e["labels"].count(IGNORE_INDEX) for e in self.examples]
        return {"round": self.round, "prompt_lengths": prompt_lengths,
                "input_ids": [e["input_ids"] for e in self.examples]}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.examples = [kept_example(ids[:n], ids[n:])
                         for n, ids in zip(state["prompt_lengths"], state["input_ids"], strict=True)]


class RoundFiles:
    """`RUN/rounds/round-N.jsonl` (N from 1): each kept sample as {"prompt", "response", "score"}."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.dir, self.enabled = Path(run_dir) / ROUNDS_DIR, enabled

    def path(self, round_index: int) -> Path:
        return self.dir / f"round-{round_index + 1}.jsonl"

    def write(self, round_index: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(round_index), "".join(json.dumps(row) + "\n" for row in rows))

    def remove_after(self, rounds_started: int) -> None:
        """After a resume: the files of rounds not started yet go (they are sampled again)."""
        if not self.enabled or not self.dir.is_dir():
            return
        for path in self.dir.glob("round-*.jsonl"):
            number = path.stem.removeprefix("round-")
            if number.isdigit() and int(number) > rounds_started:
                path.unlink()

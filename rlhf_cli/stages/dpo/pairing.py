"""Online DPO's pairs: of each prompt's sampled responses, the judge's best is chosen and its
worst rejected. A prompt whose responses all score the same gives no pair (nothing to prefer).
"""

from __future__ import annotations

from ...data.sft import IGNORE_INDEX


def best_and_worst(scores: list[float], group: int) -> list[tuple[int, int] | None]:
    """Per prompt (`group` consecutive scores each): (index of the best, index of the worst)
    into `scores`, or None when all of its scores tie. Among equal scores the first counts, so
    the pick is a function of the samples alone."""
    if group < 2 or len(scores) % group:
        raise ValueError(f"{len(scores)} scores are not groups of {group} (>= 2)")
    picks: list[tuple[int, int] | None] = []
    for start in range(0, len(scores), group):
        window = scores[start:start + group]
        high, low = max(window), min(window)
        if high == low:
            picks.append(None)
            continue
        picks.append((start + window.index(high), start + window.index(low)))
    return picks


def pair_example(prompt_ids: list[int], chosen: list[int], rejected: list[int]) -> dict:
    """A preference pair as the offline loader makes them (data/pair_tokens.py): prompt + response
    ids, the loss on the response only."""
    masked = [IGNORE_INDEX] * len(prompt_ids)
    return {"chosen_input_ids": prompt_ids + chosen, "chosen_labels": masked + chosen,
            "rejected_input_ids": prompt_ids + rejected, "rejected_labels": masked + rejected}

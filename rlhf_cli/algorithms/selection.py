"""Which sampled responses rejection sampling keeps (RFT, RAFT): pure functions of the scores.

A round's samples come as consecutive groups, one group of `group` samples per prompt. Each
rule returns the kept sample indices in sampling order. Ties are broken the same way by every
rule: the earlier sample wins.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence


def select_best(scores: Sequence[float], group: int) -> list[int]:
    """Per prompt, its highest-scored sample (RAFT "local"; Llama 2's best of K)."""
    if group < 1 or len(scores) % group:
        raise ValueError(f"{len(scores)} scores do not split into groups of {group}")
    kept = []
    for start in range(0, len(scores), group):
        # max keeps the first of equal maxima: the earliest sample of the prompt
        kept.append(max(range(start, start + group), key=lambda i: scores[i]))
    return kept


def top_count(samples: int, fraction: float) -> int:
    """How many of `samples` the top `fraction` is: rounded to the nearest, halves up, at least 1.
    (Rounded to 9 places first, so that 0.3 x 10 = 3.0000000000000004 counts as 3.)"""
    return max(1, math.floor(round(samples * fraction, 9) + 0.5))


def select_top(scores: Sequence[float], count: int) -> list[int]:
    """The `count` highest-scored samples of the whole round (RAFT "top"); at a tie on the
    boundary, the earlier samples."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:count])


def select_threshold(scores: Sequence[float], threshold: float, keys: Sequence[Hashable]) -> list[int]:
    """Every sample scored at or above `threshold` (a verifier's pass), each distinct `keys[i]`
    (its prompt and response) once: the first sample of duplicates is kept."""
    seen, kept = set(), []
    for i, score in enumerate(scores):
        if score >= threshold and keys[i] not in seen:
            seen.add(keys[i])
            kept.append(i)
    return kept

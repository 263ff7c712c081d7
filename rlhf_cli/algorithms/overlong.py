"""DAPO's soft overlong punishment (`ppo.overlong: penalty`), added to a response's score.

    R_len(|y|) = 0                          if |y| <= L_max - L_cache
               = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
               = -1                         if |y| > L_max

with L_max = ppo.max_new_tokens and L_cache = ppo.overlong_buffer (DAPO, arXiv 2503.14476,
"Overlong Reward Shaping": 4096 of 20480 there). |y| counts the response's tokens, EOS included.
"""

from __future__ import annotations

from torch import Tensor


def soft_overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """Penalty [B] (float, in [-1, 0]) for response lengths [B]; `buffer` = L_cache in [1, max_len]."""
    if not 1 <= buffer <= max_len:
        raise ValueError(f"the overlong buffer must be in [1, {max_len}], got {buffer}")
    start = max_len - buffer
    over = (lengths.float() - start).clamp(min=0)
    return -(over / buffer).clamp(max=1.0)

"""The recipe's `rrhf` section (schema.py holds the others; the same conventions).

RRHF (algorithms/rrhf.py): L = rank_weight · Σ_{r_i < r_j} max(0, p_i − p_j) + the SFT loss
on the best-scored response, with p_i = logπ(y_i) / |y_i|^length_penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema_fields import at_least


@dataclass
class RRHFSection:
    # α: 1 (the paper's) ranks responses by their mean token log-prob; 0 by the summed log-prob,
    # which favours short responses.
    length_penalty: float = at_least(1.0, 0)
    # w, the ranking term's weight against the SFT term (1 in the paper's scripts); 0 is plain
    # SFT on each prompt's best response.
    rank_weight: float = at_least(1.0, 0)

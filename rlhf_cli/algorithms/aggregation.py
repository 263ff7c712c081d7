"""Loss aggregation (`ppo.loss_aggregation`, DAPO / Dr. GRPO): per-token losses -> one loss.

Every aggregation is a sum of per-row terms over a count of *units*:

    token-mean               Σ_b Σ_t m·l / Σ_b Σ_t m          units: tokens
    seq-mean-token-mean      Σ_b (Σ_t m·l / Σ_t m) / rows     units: rows with a token
    seq-mean-token-sum-norm  Σ_b (Σ_t m·l / L) / rows         units: rows; L = ppo.max_new_tokens

(Dr. GRPO's "divide by a constant": the mean over responses of token sums over L, as trl's
loss_type "dr_grpo"; verl's mode of that name leaves out the mean over rows, a constant factor.)
A minibatch split into micro-batches (and over processes) gives the same loss, whatever the
split, when each part's aggregate is weighted by its units over the mean units per process of
the whole minibatch (stages/ppo/update.py `_share`): the units are what make that possible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .catalog import LOSS_AGGREGATION_NAMES
from .masked import masked_mean, masked_sum


@dataclass(frozen=True)
class Aggregation:
    # (losses [B, T], mask [B, T], L) -> the scalar aggregate over these rows
    aggregate: Callable[[Tensor, Tensor, int], Tensor]
    # mask [B, T] -> how many units these rows hold (float64 scalar)
    units: Callable[[Tensor], Tensor]


def _tokens(mask: Tensor) -> Tensor:
    return mask.detach().sum().to(torch.float64)


def _rows_with_tokens(mask: Tensor) -> Tensor:
    return (mask.detach() != 0).any(dim=-1).sum().to(torch.float64)


def _rows(mask: Tensor) -> Tensor:
    return torch.tensor(float(mask.shape[0]), dtype=torch.float64, device=mask.device)


def _token_mean(losses: Tensor, mask: Tensor, max_len: int) -> Tensor:
    return masked_mean(losses, mask)


def _seq_mean_token_mean(losses: Tensor, mask: Tensor, max_len: int) -> Tensor:
    per_row = masked_mean(losses, mask, dim=-1)  # an empty row gives 0 and is not counted
    return per_row.sum() / _rows_with_tokens(mask).clamp(min=1).to(per_row.dtype)


def _seq_mean_token_sum_norm(losses: Tensor, mask: Tensor, max_len: int) -> Tensor:
    per_row = masked_sum(losses.float(), mask, dim=-1) / max_len
    return per_row.sum() / max(mask.shape[0], 1)


AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": Aggregation(_token_mean, _tokens),
    "seq-mean-token-mean": Aggregation(_seq_mean_token_mean, _rows_with_tokens),
    "seq-mean-token-sum-norm": Aggregation(_seq_mean_token_sum_norm, _rows),
}

def aggregation(name: str, max_len: int = 1) -> tuple[Callable[[Tensor, Tensor], Tensor],
                                                      Callable[[Tensor], Tensor]]:
    """(aggregate(losses, mask), units(mask)) of `ppo.loss_aggregation` `name`; L = `max_len`."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {name!r}; expected one of {LOSS_AGGREGATION_NAMES}")
    spec = AGGREGATIONS[name]
    return (lambda losses, mask: spec.aggregate(losses, mask, max_len)), spec.units

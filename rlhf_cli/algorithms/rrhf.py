"""RRHF (Yuan et al. 2023, "Rank Responses to Align Language Models with Human Feedback without
tears"): the policy's length-normalised log-probabilities of K scored responses to a prompt
should be ordered as their scores are, and the best response is learnt as in SFT.

For the responses y_1..y_K of one prompt, with scores r_i and summed token log-probs logπ(y_i)
over |y_i| response tokens:

    p_i    = logπ(y_i) / |y_i|^α              α = rrhf.length_penalty (1: the token mean, 0: the sum)
    L_rank = Σ_{r_i < r_j} max(0, p_i − p_j)  every pair the scores order, no margin; ties add nothing
    L_ft   = −logπ(y_b) / |y_b|,  b = argmax r (the first of equally best responses)
    L      = w·L_rank + L_ft                  w = rrhf.rank_weight

L_ft normalisation: the paper writes L_ft as a sum over the best response's tokens (its eq. 3;
the authors' code averages over the row's positions instead). We take the mean over its tokens,
the cross-entropy `rlhf sft` computes for a batch of that one response, so that the term does
not grow with the response's length against L_rank. No reference model is involved.

Shapes: the responses of G prompts are flattened into N rows; `groups` [N] (long) says which
prompt each row answers (0..G-1), `scores` [N] its score. Each function returns per-prompt
values [G]; the stage sums them and the engine divides by the number of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def length_normalised(logp_sums: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """p_i = logπ(y_i) / |y_i|^α, [N]; `lengths` [N] counts each response's tokens (> 0)."""
    return logp_sums / lengths.clamp(min=1).to(logp_sums.dtype).pow(alpha)


def ordered_pairs(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: entry (i, j) is true when rows i and j answer the same prompt and r_i < r_j."""
    same = groups[:, None] == groups[None, :]
    return same & (scores[:, None] < scores[None, :])


def ranking_loss(p: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                 num_groups: int) -> torch.Tensor:
    """L_rank of each prompt, [G]: Σ over its ordered pairs (i worse than j) of max(0, p_i − p_j)."""
    hinge = (p[:, None] - p[None, :]).clamp(min=0) * ordered_pairs(scores, groups)
    return p.new_zeros(num_groups).index_add(0, groups, hinge.sum(dim=1))


def best_responses(scores: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The row index of each prompt's best-scored response, [G] (long); on a tie the first row."""
    best_score = scores.new_full((num_groups,), float("-inf")).scatter_reduce(
        0, groups, scores, reduce="amax")
    rows = torch.arange(scores.shape[0], device=scores.device)
    candidates = torch.where(scores == best_score[groups], rows, scores.shape[0])
    return torch.full((num_groups,), scores.shape[0], device=scores.device).scatter_reduce(
        0, groups, candidates, reduce="amin")


@dataclass
class RRHFTerms:
    """Per prompt, [G]: the loss and its parts, and how many ordered pairs p gets wrong."""

    loss: torch.Tensor  # w·L_rank + L_ft
    rank: torch.Tensor  # L_rank
    sft: torch.Tensor  # L_ft (token-mean NLL of the best response)
    pairs: torch.Tensor  # ordered pairs (r_i < r_j)
    misordered: torch.Tensor  # of those, the pairs with p_i > p_j (they carry loss)


def rrhf_loss(logp_sums: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor,
              groups: torch.Tensor, num_groups: int, *, rank_weight: float = 1.0,
              length_penalty: float = 1.0) -> RRHFTerms:
    """RRHF's loss per prompt from each response's summed log-prob and token count, [N] each."""
    p = length_normalised(logp_sums, lengths, length_penalty)
    rank = ranking_loss(p, scores, groups, num_groups)
    best = best_responses(scores, groups, num_groups)
    sft = -logp_sums[best] / lengths[best].clamp(min=1).to(logp_sums.dtype)
    pairs = ordered_pairs(scores, groups)
    misordered = pairs & (p[:, None] > p[None, :]).detach()
    per_group = [torch.zeros(num_groups, device=p.device).index_add(0, groups, m.sum(dim=1).float())
                 for m in (pairs, misordered)]
    return RRHFTerms(loss=rank_weight * rank + sft, rank=rank, sft=sft,
                     pairs=per_group[0], misordered=per_group[1])

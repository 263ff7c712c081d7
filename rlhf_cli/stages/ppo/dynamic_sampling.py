"""DAPO's dynamic sampling (`ppo.dynamic_sampling`): keep only the prompts whose samples did
not all score the same (an all-equal group has advantage 0: no signal, only a smaller batch),
and sample more prompts until every process has `ppo.rollout_batch_size` such groups.

- Round 0 samples the iteration's own prompts (engine/batching.py GlobalBatches, as without
  dynamic sampling); round k >= 1 samples `rollout_batch_size` prompts from a second order
  of the prompts, at position `iteration · (max_sampling_rounds − 1) + k − 1`: a function of
  the iteration and round numbers, like the first, so that `--resume` stays exact.
- Every process makes the same number of generate calls (ZeRO-3 gathers weights in each): after
  each round the processes sum how many of them are still short, and all stop together when
  none is, or after `ppo.max_sampling_rounds` rounds. A process still short then fills its batch
  with dropped groups (advantage 0 with grpo/rloo), so that every batch has the same size.
- "Scored the same" is judged on the scores the advantages see (shape_scores: EOS and overlong
  penalties, clipping).
- `frac_reward_zero_std` (as trl's GRPO logs it: the share of groups with no signal) counts
  every group sampled this iteration, in all rounds and processes, before the filter: how much
  of the sampling the filter threw away. The trained batch's share would be 0 by construction
  whenever the batch filled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...algorithms.advantages import informative_groups
from ...engine.batching import GlobalBatches
from ...engine.reduce import global_sums
from ...engine.rollout import Rollout
from .experience import shape_scores

# The second prompt order's seed is the run's seed plus this (a different permutation).
EXTRA_ORDER_SEED_OFFSET = 7_919


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's rows `rows` (bool [B])."""
    rows = rows.cpu()
    take = [t[rows.to(t.device)] for t in (rollout.input_ids, rollout.attention_mask, rollout.response_mask,
                                           rollout.tokens, rollout.ended)]
    return Rollout(*take[:4], rollout.prompt_width, take[4],
                   [p for p, keep in zip(rollout.prompts, rows.tolist(), strict=True) if keep])


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of the rows of `parts`: prompts left-padded to the widest, responses
    right-padded to the longest (masked out, as `sample` lays them out)."""
    width = max(r.prompt_width for r in parts)
    length = max(r.tokens.shape[1] for r in parts)
    prompts, prompt_masks, tokens, masks = [], [], [], []
    for r in parts:
        left, right = width - r.prompt_width, length - r.tokens.shape[1]
        prompts.append(F.pad(r.input_ids[:, :r.prompt_width], (left, 0), value=pad_id))
        prompt_masks.append(F.pad(r.attention_mask[:, :r.prompt_width], (left, 0), value=0))
        tokens.append(F.pad(r.tokens, (0, right), value=pad_id))
        masks.append(F.pad(r.response_mask, (0, right), value=0.0))
    prompt_ids, prompt_mask = torch.cat(prompts), torch.cat(prompt_masks)
    response_tokens, response_mask = torch.cat(tokens), torch.cat(masks)
    return Rollout(torch.cat([prompt_ids, response_tokens], dim=1),
                   torch.cat([prompt_mask, response_mask.long()], dim=1), response_mask, response_tokens,
                   width, torch.cat([r.ended for r in parts]), [p for r in parts for p in r.prompts])


class DynamicSampling:
    """`sampler(index) -> (rollout, raw scores, responses, metrics)`; `sample_prompts(prompts)`
    samples each prompt samples_per_prompt times, `score(rollout, index)` gives (scores, responses)."""

    def __init__(self, ppo, prompts: list, batches: GlobalBatches, backend, seed: int, sample_prompts, score,
                 reward_stats: dict | None, pad_id: int):
        self.ppo, self.prompts, self.batches, self.backend = ppo, prompts, batches, backend
        self.sample_prompts, self.score = sample_prompts, score
        self.reward_stats, self.pad_id = reward_stats, pad_id
        self.extra = GlobalBatches(len(prompts), ppo.rollout_batch_size, 1, backend.world_size, backend.rank,
                                   seed + EXTRA_ORDER_SEED_OFFSET)

    def prompt_indices(self, index: int, round_: int) -> list[int]:
        if round_ == 0:
            return self.batches.micro_batches(index)[0]
        return self.extra.micro_batches(index * (self.ppo.max_sampling_rounds - 1) + round_ - 1)[0]

    def _informative(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        shaped = shape_scores(scores, rollout.ended.to(scores.device), self.ppo, self.reward_stats,
                              lengths=rollout.response_mask.sum(dim=1))
        return informative_groups(shaped, self.ppo.samples_per_prompt)

    def __call__(self, index: int) -> tuple[Rollout, torch.Tensor, list[str], dict]:
        group, target = self.ppo.samples_per_prompt, self.ppo.rollout_batch_size
        kept, dropped, rounds, flat = [], [], 0, 0
        while rounds < self.ppo.max_sampling_rounds:
            rollout = self.sample_prompts([self.prompts[i] for i in self.prompt_indices(index, rounds)])
            scores, responses = self.score(rollout, index)
            informative = self._informative(rollout, scores)
            flat += int((~informative).sum())
            rows = informative.repeat_interleave(group).to(scores.device)
            for pile, wanted in ((kept, rows), (dropped, ~rows)):
                pile.append((select_rows(rollout, wanted), scores[wanted],
                             [r for r, w in zip(responses, wanted.tolist(), strict=True) if w]))
            rounds += 1
            kept_groups = sum(s.numel() for _, s, _ in kept) // group
            if not global_sums(self.backend, {"short": float(kept_groups < target)})["short"]:
                break
        pieces = [p for p in kept + dropped if p[1].numel()]
        rollout = concat_rollouts([r for r, _, _ in pieces], self.pad_id)
        batch = select_rows(rollout, torch.arange(len(rollout.prompts)) < target * group)
        scores = torch.cat([s for _, s, _ in pieces])[: target * group]
        responses = [r for _, _, rs in pieces for r in rs][: target * group]
        totals = global_sums(self.backend, {"prompts_drawn": float(rounds * target),
                                            "groups_kept": float(min(kept_groups, target)),
                                            "flat_groups": float(flat)})
        share = totals.pop("flat_groups") / max(totals["prompts_drawn"], 1.0)
        return batch, scores, responses, {**totals, "sampling_rounds": rounds, "frac_reward_zero_std": share}

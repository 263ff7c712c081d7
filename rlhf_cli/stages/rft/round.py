"""One round's sampling half: sample K responses per prompt, score them, keep some.

    prompts -> sample (engine/rollout.py) -> judge (engine/judge.py) -> select (algorithms/selection.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...algorithms.selection import select_best, select_threshold, select_top, top_count
from ...engine.rollout import PlainPolicy, decode_responses, sample
from ...schema import RFTSection


@dataclass
class Samples:
    """A round's samples in sampling order: prompt p's K samples are rows p*K .. p*K+K-1."""

    examples: list[dict]  # the prompt example of each sample ({"prompt", "prompt_input_ids"})
    responses: list[str]
    response_ids: list[list[int]]  # the sampled tokens, EOS included when the response ended
    scores: list[float]


def sample_and_score(lm, prompts: list[dict], tokenizer, rft: RFTSection, judge, device,
                     synced: bool = False) -> Samples:
    """Each prompt sampled `rft.samples_per_prompt` times, `rft.sample_batch_size` responses
    per generate call, each batch scored by the judge as it comes (make_judge's judges refuse a
    wrong count of scores and NaN/inf ones)."""
    examples = [p for p in prompts for _ in range(rft.samples_per_prompt)]  # as sample_round rebuilds them
    policy = PlainPolicy(lm)
    out = Samples(examples, [], [], [])
    for start in range(0, len(examples), rft.sample_batch_size):
        rollout = sample(policy, examples[start:start + rft.sample_batch_size], tokenizer, rft, device,
                         synced)
        responses = decode_responses(rollout, tokenizer)
        scores = judge(rollout, responses)
        out.responses += responses
        out.response_ids += [t[m.bool()].tolist() for t, m in zip(rollout.tokens, rollout.response_mask,
                                                                   strict=True)]
        out.scores += scores.tolist()
    return out


def rank_share(prompts: list, rank: int, world_size: int) -> list:
    """The round's prompts this rank samples: every `world_size`-th, from its rank."""
    return prompts[rank::world_size]


def merge_shares(shares: list[Samples], group: int) -> Samples:
    """The ranks' samples (rank order, each from `rank_share`) back in the round's order:
    prompt j's `group` samples are those of rank j % W, at its position j // W."""
    world = len(shares)
    prompts = sum(len(s.scores) for s in shares) // group
    out = Samples([], [], [], [])
    for j in range(prompts):
        share, rows = shares[j % world], slice((j // world) * group, (j // world + 1) * group)
        out.examples += share.examples[rows]
        out.responses += share.responses[rows]
        out.response_ids += share.response_ids[rows]
        out.scores += share.scores[rows]
    return out


def sample_round(lm, prompts: list[dict], tokenizer, rft: RFTSection, judge, backend) -> Samples:
    """The whole round's samples on every rank: each rank samples and scores its share, and
    the shares are gathered, so that the selection sees the whole round, the same on every rank."""
    mine = rank_share(prompts, backend.rank, backend.world_size)
    samples = sample_and_score(lm, mine, tokenizer, rft, judge, backend.device,
                               synced=backend.world_size > 1)
    if backend.world_size == 1:
        return samples
    # Only the sampled texts, tokens and scores travel (the prompt examples are each rank's own,
    # and not all of them pickle); each share's examples are rebuilt from the round's prompts.
    gathered = backend.all_gather_object((samples.responses, samples.response_ids, samples.scores))
    group, world = rft.samples_per_prompt, backend.world_size
    shares = [Samples([p for p in rank_share(prompts, rank, world) for _ in range(group)], *texts)
              for rank, texts in enumerate(gathered)]
    return merge_shares(shares, group)


def kept_indices(samples: Samples, rft: RFTSection) -> list[int]:
    scores = samples.scores
    if rft.select == "best":
        return select_best(scores, rft.samples_per_prompt)
    if rft.select == "top_fraction":
        return select_top(scores, top_count(len(scores), rft.top_fraction))
    keys = [(e["prompt"], r) for e, r in zip(samples.examples, samples.responses, strict=True)]
    return select_threshold(scores, rft.threshold, keys)


def round_metrics(samples: Samples, kept: list[int]) -> dict:
    """Mean score of all samples and of the kept ones, the kept share, distinct kept responses."""
    scores = samples.scores
    row = {"score": sum(scores) / len(scores),
           "kept_share": len(kept) / len(scores), "kept": len(kept),
           "distinct_kept": len({(samples.examples[i]["prompt"], samples.responses[i]) for i in kept}),
           "response_length": sum(map(len, samples.response_ids)) / len(scores)}
    if kept:  # no mean of nothing (a NaN would only be a string in metrics.jsonl)
        row["kept_score"] = math.fsum(scores[i] for i in kept) / len(kept)
    return row

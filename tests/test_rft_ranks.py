"""rft on several ranks, in process (fast): each rank samples its share of the round's prompts,
the shares are gathered back into the round's order, and every rank selects the same samples,
the ones one process selects. Two ranks are two threads whose gather meets at a barrier."""

from __future__ import annotations

import threading
import zlib

import pytest
import torch

from rlhf_cli.schema import RFTSection
from rlhf_cli.stages.rft import round as rft_round
from rlhf_cli.stages.rft.round import Samples, kept_indices, merge_shares, rank_share, sample_round

K = 3
PROMPTS = [{"prompt": f"p{i}", "prompt_input_ids": [i]} for i in range(8)]


def fake_sample_and_score(lm, prompts, tokenizer, rft, judge, device, synced=False) -> Samples:
    """K samples per prompt whose responses and scores depend on the prompt alone (so any rank
    sampling a prompt gets the same ones); ties within and across prompts on purpose."""
    out = Samples([], [], [], [])
    for example in prompts:
        for k in range(K):
            code = zlib.crc32(f"{example['prompt']}/{k}".encode())
            out.examples.append(example)
            out.responses.append(f"r{code % 4}")
            out.response_ids.append([code % 4, 99])
            out.scores.append(float(code % 5) / 4)
    return out


class ThreadRank:
    """A backend stand-in: rank `rank` of `world`; all_gather_object meets the other threads."""

    def __init__(self, rank: int, world: int, board: dict, barrier: threading.Barrier):
        self.rank, self.world_size, self.device = rank, world, torch.device("cpu")
        self.board, self.barrier = board, barrier

    def all_gather_object(self, obj) -> list:
        self.board[self.rank] = obj
        self.barrier.wait(timeout=10)
        return [self.board[r] for r in range(self.world_size)]


def run_ranks(world: int, rft: RFTSection) -> list[tuple[Samples, list[int]]]:
    board, barrier, results = {}, threading.Barrier(world), [None] * world

    def one(rank):
        samples = sample_round(None, PROMPTS, None, rft, None, ThreadRank(rank, world, board, barrier))
        results[rank] = (samples, kept_indices(samples, rft))

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    return results


@pytest.mark.parametrize("select, extra", [("best", {}), ("top_fraction", {"top_fraction": 0.25}),
                                           ("threshold", {"threshold": 0.5})])
def test_two_ranks_select_what_one_process_selects(monkeypatch, select, extra):
    monkeypatch.setattr(rft_round, "sample_and_score", fake_sample_and_score)
    rft = RFTSection(samples_per_prompt=K, prompts_per_round=len(PROMPTS), select=select, **extra)
    (one, one_kept), = run_ranks(1, rft)
    two = run_ranks(2, rft)
    for samples, kept in two:
        assert samples == one and kept == one_kept  # the whole round, the same selection
    assert one_kept  # the selection keeps something
    # Every prompt of the round was considered once, in the round's order.
    assert [e["prompt"] for e in one.examples] == [p["prompt"] for p in PROMPTS for _ in range(K)]


def test_shares_split_the_round_and_merge_back_in_order():
    whole = fake_sample_and_score(None, PROMPTS, None, None, None, None)
    shares = [fake_sample_and_score(None, rank_share(PROMPTS, r, 3), None, None, None, None)
              for r in range(3)]
    assert sorted(p["prompt"] for r in range(3) for p in rank_share(PROMPTS, r, 3)) == sorted(
        p["prompt"] for p in PROMPTS)
    assert merge_shares(shares, K) == whole
    assert merge_shares(shares[::-1], K) != whole  # the rank order matters: the check can fail

"""Rejection sampling's selection rules, worked by hand, and what a round keeps and carries
across a checkpoint; bad `rft` recipes as `error:` lines (fast)."""

from __future__ import annotations

import pytest
from cli_helpers import REPO, error_line, rlhf

from rlhf_cli.algorithms.selection import select_best, select_threshold, select_top, top_count
from rlhf_cli.stages.rft.round import Samples, kept_indices, round_metrics
from rlhf_cli.stages.rft.rounds import KeptSamples, RoundFiles, kept_example

# Two prompts x three samples: prompt 0 has a tie at its maximum (samples 1 and 2).
SCORES = [0.1, 0.9, 0.9, 0.5, 0.2, 0.4]


def test_best_keeps_each_prompts_highest_and_the_earlier_of_a_tie():
    assert select_best(SCORES, 3) == [1, 3]
    assert select_best([0.0, 0.0, 0.0, 0.0], 2) == [0, 2]  # all equal: each prompt's first
    assert select_best(SCORES, 1) == list(range(6))  # one sample a prompt: all kept
    with pytest.raises(ValueError):
        select_best(SCORES, 4)


def test_top_keeps_the_best_of_the_whole_round_in_sampling_order():
    assert select_top(SCORES, 1) == [1]
    assert select_top(SCORES, 2) == [1, 2]  # both 0.9s, across the tie
    assert select_top(SCORES, 3) == [1, 2, 3]  # then 0.5
    assert select_top([1.0, 0.5, 0.5, 0.5], 2) == [0, 1]  # a tie on the boundary: the earlier
    assert select_top(SCORES, 6) == list(range(6))


def test_top_fraction_rounds_to_the_nearest_halves_up_at_least_one():
    assert top_count(10, 0.2) == 2
    assert top_count(10, 0.3) == 3  # 0.3 x 10 = 3.0000000000000004 in floats, still 3
    assert top_count(10, 0.25) == 3  # 2.5 rounds up
    assert top_count(12, 0.2) == 2  # 2.4
    assert top_count(13, 0.2) == 3  # 2.6
    assert top_count(10, 0.01) == 1  # 0.1: never nothing
    assert top_count(7, 1.0) == 7


def test_threshold_keeps_every_pass_at_or_above_it_once():
    keys = [("p", "x"), ("p", "x"), ("p", "y"), ("q", "x"), ("q", "x"), ("q", "z")]
    scores = [1.0, 1.0, 0.99, 1.0, 0.5, 2.0]
    # 0 kept; 1 is 0's duplicate; 2 below; 3 same response as 0 but another prompt: kept;
    # 4 below (and a duplicate); 5 above.
    assert select_threshold(scores, 1.0, keys) == [0, 3, 5]
    assert select_threshold(scores, 0.5, keys) == [0, 2, 3, 5]  # 4 passes but repeats 3
    assert select_threshold(scores, 3.0, keys) == []


def _samples(scores: list[float], responses: list[str], group: int) -> Samples:
    examples = [{"prompt": f"p{i // group}", "prompt_input_ids": [1, 10 + i // group]}
                for i in range(len(scores))]
    ids = [[ord(c) for c in r] + [2] for r in responses]
    return Samples(examples, responses, ids, scores)


def test_a_rounds_selection_and_figures():
    from rlhf_cli.config import build_recipe

    def rft(**keys):
        return build_recipe({"stage": "rft", "data": {"train": "builtin:sort"}, "train": {"max_steps": 4},
                             "rft": {"reward_fn": "m:f", "samples_per_prompt": 2, **keys}}).rft

    samples = _samples([1.0, 1.0, 0.0, 1.0], ["ab", "ab", "ba", "cd"], group=2)
    assert kept_indices(samples, rft(select="best")) == [0, 3]
    assert kept_indices(samples, rft(select="top_fraction", top_fraction=0.5)) == [0, 1]
    # sample 1 repeats sample 0's (prompt, response); sample 2 fails
    assert kept_indices(samples, rft(select="threshold", threshold=1.0)) == [0, 3]
    row = round_metrics(samples, [0, 1])
    assert row["score"] == 0.75 and row["kept_score"] == 1.0 and row["kept_share"] == 0.5
    assert row["kept"] == 2 and row["distinct_kept"] == 1 and row["response_length"] == 3.0
    assert "kept_score" not in round_metrics(samples, [])


def test_kept_samples_are_trained_as_sampled_and_survive_a_checkpoint(tmp_path):
    example = kept_example([1, 5, 6], [7, 8, 2])
    assert example == {"input_ids": [1, 5, 6, 7, 8, 2], "labels": [-100, -100, -100, 7, 8, 2]}
    kept = KeptSamples()
    kept.set(3, [example, kept_example([1], [2])])
    again = KeptSamples()
    again.load_state_dict(kept.state_dict())
    assert again.round == 3 and again.examples == kept.examples

    files = RoundFiles(tmp_path, enabled=True)
    for index in range(3):
        files.write(index, [{"prompt": "p", "response": "r", "score": float(index)}])
    first = (tmp_path / "rounds" / "round-1.jsonl").read_text()
    assert first == '{"prompt": "p", "response": "r", "score": 0.0}\n'
    files.remove_after(rounds_started=1)
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["round-1.jsonl"]


@pytest.mark.parametrize("setting, key, text", [
    ("rft.select=threshold", "rft.threshold", "select: threshold keeps every sample scored at or above it"),
    ("rft.reward_fn=null", "rft", "needs a judge: set `rft.reward_model` or `rft.reward_fn`"),
    ("rft.samples_per_prompt=0", "rft.samples_per_prompt", "must be >= 1, got 0"),
    ("launch.num_processes=3", "rft.prompts_per_round", "each of the 3 processes samples an equal share"),
])
def test_bad_rft_recipes_are_one_error_line(setting, key, text, rlhf_home, tmp_path):
    proc = rlhf("rft", "--recipe", str(REPO / "recipes" / "tiny-rft.yaml"), "--set", setting, "-o", "run",
                cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert text in line and key in line, line
    assert not (tmp_path / "run").exists()

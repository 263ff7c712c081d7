"""`rlhf rft` end to end through the real CLI (slow): one round (rejection sampling / RFT) and
several (RAFT) from a 40-step SFT model raise the greedy held-out score of the built-in sort
task; a run stopped by Ctrl-C and resumed equals an uninterrupted one."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cli_helpers import REPO, read_jsonl, rlhf
from fault_helpers import assert_same_run, assert_stopped_cleanly, ctrl_c_after_two_rows, start, stopped_at

from rlhf_cli.builtin.tasks import sort_reward

RFT = str(REPO / "recipes" / "tiny-rft.yaml")
RAFT = str(REPO / "recipes" / "tiny-raft.yaml")


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rft_e2e")


@pytest.fixture(scope="module")
def sft_base(work) -> Path:
    """A 40-step SFT model, merged: it sorts some prompts right and has room to improve."""
    proc = rlhf("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "-o", "sft",
                "--set", "train.max_steps=40", "--set", "train.warmup_steps=5",
                "--set", "train.eval_every=null", "--set", "train.save_every=null", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = rlhf("merge-lora", "sft", "--out", "sft-merged", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "sft-merged"


def greedy_scores(run: Path) -> dict[int, float]:
    return {r["step"]: r["score"] for r in read_jsonl(run / "metrics.jsonl") if r.get("split") == "eval"}


def assert_round_files(run: Path, rounds: int, kept_per_round: int) -> list[dict]:
    """Each round's kept samples in rounds/round-N.jsonl, their scores the reward function's own;
    the round rows of metrics.jsonl agree with them. The round rows."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("split") != "eval" and "kept" in r]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        kept = read_jsonl(run / "rounds" / f"round-{row['round']}.jsonl")
        assert len(kept) == row["kept"] == kept_per_round
        assert [k["score"] for k in kept] == pytest.approx(
            sort_reward([k["prompt"] for k in kept], [k["response"] for k in kept]))
        assert row["kept_score"] == pytest.approx(sum(k["score"] for k in kept) / len(kept))
        assert row["distinct_kept"] == len({(k["prompt"], k["response"]) for k in kept})
        assert row["kept_score"] >= row["score"]  # the best of 8 beats the mean of 8
    assert not (run / "rounds" / f"round-{rounds + 1}.jsonl").exists()
    return rows


@pytest.mark.slow
def test_one_round_of_rejection_sampling_raises_the_greedy_score(work, sft_base):
    proc = rlhf("rft", "--recipe", RFT, "-o", "rft", "--set", f"model.base={sft_base}", cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = work / "rft"
    rows = assert_round_files(run, rounds=1, kept_per_round=256)
    assert rows[0]["kept_share"] == 1 / 8
    scores = greedy_scores(run)
    print("rft greedy held-out score", scores)
    assert scores[max(scores)] > scores[0] + 0.05, scores
    assert (run / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_raft_rounds_raise_the_greedy_score(work, sft_base):
    proc = rlhf("rft", "--recipe", RAFT, "-o", "raft", "--set", f"model.base={sft_base}", cwd=work,
                timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = work / "raft"
    rows = assert_round_files(run, rounds=4, kept_per_round=128)
    scores = greedy_scores(run)
    print("raft greedy held-out score", scores, "sample score by round", [r["score"] for r in rows])
    assert scores[max(scores)] > scores[0] + 0.05, scores
    assert rows[-1]["score"] > rows[0]["score"]  # later rounds sample from a better policy


SMALL = [arg for key in ("train.eval_reward_fn=null", "train.eval_every=null", "train.log_every=1",
                          "train.save_every=null", "train.batch_size=8", "rft.rounds=4",
                          "rft.prompts_per_round=8", "rft.samples_per_prompt=4", "train.max_steps=6",
                          "rft.select=top_fraction", "rft.top_fraction=0.25")
         for arg in ("--set", key)]


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(rlhf_home, tmp_path):
    """From the random base (scores near 0: the top quarter still ranks them); 4 rounds of 6
    steps, each a new sample of 8 prompts x 4."""
    args = ["rft", "--recipe", RFT, *SMALL]
    run = tmp_path / "run"
    stderr = ctrl_c_after_two_rows(start([*args, "-o", "run"], tmp_path), run)
    step, checkpoint, command = stopped_at(stderr, "step", 24)
    assert_stopped_cleanly(run, tmp_path / checkpoint, step)
    rounds_started = -(-step // 6)
    assert sorted(p.name for p in (run / "rounds").iterdir()) == [
        f"round-{n}.jsonl" for n in range(1, rounds_started + 1)]

    resumed = rlhf(*shlex.split(command)[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resuming from .*\(step {step}\)", resumed.stderr), resumed.stderr
    straight = rlhf(*args, "-o", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert_same_run(run, tmp_path / "straight")
    for n in range(1, 5):
        name = f"round-{n}.jsonl"
        assert (run / "rounds" / name).read_text() == (tmp_path / "straight" / "rounds" / name).read_text()


@pytest.mark.slow
def test_a_reward_model_judges_as_a_frozen_adapter_on_the_policy(rm_run, tmp_path):
    """rft.reward_model: conftest's RM (a LoRA on builtin:tiny) rides on the policy's base; the
    kept samples carry its scores (not the task's), final/ holds the policy adapter alone, and
    the round's figures are the kept scores' (test_rft_round.py checks the scores themselves).
    From the random base, scores are distinct: a task score would be 0 for almost all."""
    args = ["rft", "--recipe", RFT, *SMALL, "--set", "rft.rounds=1", "--set", "rft.reward_fn=null",
            "--set", f"rft.reward_model={rm_run}", "-o", "rm"]
    proc = rlhf(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "rm"
    kept = read_jsonl(run / "rounds" / "round-1.jsonl")
    assert len(kept) == 8 and len({k["score"] for k in kept}) > 1
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert not (run / "final" / "reward").exists()  # peft would write a second adapter there
    row = next(r for r in read_jsonl(run / "metrics.jsonl") if "kept" in r)
    assert row["kept_score"] == pytest.approx(sum(k["score"] for k in kept) / 8)


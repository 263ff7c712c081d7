"""`rlhf rft` on two real gloo processes through the real CLI (slow): each rank scores its share
of a round's prompts, every rank keeps the same samples, chosen from the whole round, the kept
file holds each prompt of the round once, and a resumed run equals the uninterrupted one.

The reward function is a file of the test's own (`probe.py`): it records which prompts each
rank scored, and it wraps the stage's selection to record what each rank kept."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import REPO, read_jsonl, rlhf
from fault_helpers import assert_same_run

from rlhf_cli.algorithms.selection import select_best

PROMPTS, K, ROUNDS, STEPS = 6, 2, 2, 2  # per round: 6 prompts x 2 samples, 2 SFT steps

PROBE = '''
import json, os
from pathlib import Path
import rlhf_cli.stages.rft.run as rft_run

HERE, RANK = Path(__file__).parent, os.environ.get("RANK", "0")
_select = rft_run.kept_indices

def _recorded(samples, rft):
    kept = _select(samples, rft)
    rows = [[samples.examples[i]["prompt"], samples.responses[i], samples.scores[i]] for i in kept]
    with open(HERE / f"kept-rank{RANK}.jsonl", "a") as f:
        f.write(json.dumps(rows) + "\\n")
    return kept

rft_run.kept_indices = _recorded

def reward(prompts, responses):
    with open(HERE / f"scored-rank{RANK}.jsonl", "a") as f:
        f.write(json.dumps([[p, r] for p, r in zip(prompts, responses)]) + "\\n")
    return [len(set(r)) / 10 for r in responses]  # varied scores, ties too
'''


def rft(work: Path, out: str, resume: bool = False) -> subprocess.CompletedProcess:
    settings = ["model.base=builtin:tiny", "launch.num_processes=2",
                f"rft.reward_fn={work / 'probe.py'}:reward",
                f"rft.rounds={ROUNDS}", f"rft.prompts_per_round={PROMPTS}", f"rft.samples_per_prompt={K}",
                "rft.max_new_tokens=6", "rft.sample_batch_size=4", "train.batch_size=2",
                f"train.max_steps={STEPS}", "train.save_every=2", "train.log_every=1",
                "train.eval_reward_fn=null", "data.eval=null", "data.max_length=32"]
    args = ["rft", "--recipe", str(REPO / "recipes" / "tiny-rft.yaml"), "-o", out]
    for setting in settings:
        args += ["--set", setting]
    proc = rlhf(*args, *(["--resume"] if resume else []), cwd=work, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(work: Path, name: str) -> list:
    return [json.loads(line) for line in (work / name).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_select_the_same_samples_from_the_whole_round(rlhf_home, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    rft(tmp_path, "run")
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    kept0, kept1 = records(tmp_path, "kept-rank0.jsonl"), records(tmp_path, "kept-rank1.jsonl")
    assert len(kept0) == ROUNDS and kept0 == kept1  # every rank kept the same samples
    scored0, scored1 = records(tmp_path, "scored-rank0.jsonl"), records(tmp_path, "scored-rank1.jsonl")
    # Each rank's share (3 prompts x 2 samples) in generate calls of 4 and 2.
    assert [len(c) for c in scored0] == [len(c) for c in scored1] == [4, 2] * ROUNDS
    for r in range(ROUNDS):
        mine = [[s for c in calls[2 * r:2 * r + 2] for s in c] for calls in (scored0, scored1)]
        prompts = [{p for p, _ in share} for share in mine]
        assert len(prompts[0]) == len(prompts[1]) == PROMPTS // 2 and not prompts[0] & prompts[1]
        # The round's order interleaves the shares; select_best on it gives the kept file.
        whole = [s for j in range(PROMPTS) for s in mine[j % 2][(j // 2) * K:(j // 2 + 1) * K]]
        scores = [len(set(resp)) / 10 for _, resp in whole]
        best = select_best(scores, K)
        kept_file = read_jsonl(run / "rounds" / f"round-{r + 1}.jsonl")
        assert [[k["prompt"], k["response"]] for k in kept_file] == [whole[i] for i in best]
        assert [k["score"] for k in kept_file] == pytest.approx([scores[i] for i in best])  # float32
        assert [[k["prompt"], k["response"], k["score"]] for k in kept_file] == kept0[r]
        assert sorted(k["prompt"] for k in kept_file) == sorted(prompts[0] | prompts[1])  # each once

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-2"]  # round 2 not begun
    for name in ("kept-rank0.jsonl", "kept-rank1.jsonl"):
        (tmp_path / name).unlink()
    proc = rft(tmp_path, "resumed", resume=True)
    assert "resuming from" in proc.stderr
    assert len(records(tmp_path, "kept-rank0.jsonl")) == 1  # round 2 only
    assert_same_run(resumed, run)
    for r in range(ROUNDS):
        name = f"round-{r + 1}.jsonl"
        assert (resumed / "rounds" / name).read_text() == (run / "rounds" / name).read_text()

"""RLHF on the built-in task learns, end to end through the real CLI, from a 40-step SFT model
(the starting point the tiny recipes name):

- every PPO arrangement's tiny recipe raises the task score clearly above the SFT policy's;
- a reward model trained with recipes/tiny-rm.yaml on that SFT model ranks the exact answer
  above held-out wrong answers of every kind in the built-in pairs (extra, missing, wrong
  or misordered letters), the holes PPO would otherwise exploit.

Measured (greedy held-out score of 128 prompts, sort_reward; 2 busy cores): the SFT policy
scores 0.806 (52% solved). After 20 of the recipes' 60 iterations: 1base-1lora 0.876,
1base-2lora 0.906, 2base-2lora and separate 0.863 (these two compute the same thing with a
reward function); after 60: 0.956, 0.992, 0.995, 0.995 (91-99% solved). The sampled score
of iterations 16-20 was 0.074-0.104 above that of iterations 1-5.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import cli_helpers
import pytest
from cli_helpers import REPO, read_jsonl

from rlhf_cli.builtin.tasks import MISTAKES, sort_rows

ARRANGEMENTS = ("1base-1lora", "1base-2lora", "2base-2lora", "separate")
ITERATIONS = 20
MIN_RISE = 0.04  # measured rises are 0.057-0.100 (greedy) and 0.074-0.104 (sampled)
RM_STEPS = 300
# Held-out accuracy each kind of mistake must reach: the kinds the data names (extra letters,
# missing letters, wrong order) 0.95; wrong letters 0.8. Measured 1.0 for all but
# replace_one 0.935 and substitute_sorted 0.855; with the earlier pairs, insert_foreign ~0.5.
RM_MIN_ACCURACY = {kind: 0.95 for kind in MISTAKES} | {"replace_one": 0.8, "substitute_sorted": 0.8}

pytestmark = pytest.mark.slow


def rlhf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`rlhf ARGS`, which must succeed (PYTHONPATH as inherited: the installed rlhf_cli)."""
    proc = cli_helpers.rlhf(*args, cwd=cwd, timeout=600, pythonpath=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("learn")


@pytest.fixture(scope="module")
def sft_model(work) -> Path:
    rlhf("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "-o", "sft",
         "--set", "train.max_steps=40", "--set", "train.warmup_steps=5", "--set", "train.eval_every=null",
         "--set", "train.save_every=null", "--set", "train.eval_reward_fn=null", cwd=work)
    rlhf("merge-lora", "sft", "--out", "sft-merged", cwd=work)
    return work / "sft-merged"


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_ppo_raises_the_task_score_above_the_sft_policy(arrangement, work, sft_model):
    out = f"ppo-{arrangement}"
    rlhf("ppo", "--recipe", str(REPO / "recipes" / f"tiny-ppo-{arrangement}.yaml"), "-o", out,
         "--set", f"model.base={sft_model}", "--set", f"train.max_steps={ITERATIONS}",
         "--set", "train.eval_every=null", "--set", "train.save_every=null", cwd=work)
    rows = read_jsonl(work / out / "metrics.jsonl")
    evals = [r for r in rows if r.get("split") == "eval"]
    train = [r for r in rows if r.get("split") != "eval"]
    assert [r["step"] for r in evals] == [0, ITERATIONS] and len(train) == ITERATIONS
    # Step 0 is the SFT policy itself (the fresh adapter changes nothing): greedy, held out.
    sft, ppo = evals[0], evals[-1]
    assert ppo["score"] >= sft["score"] + MIN_RISE, (sft, ppo)
    assert ppo["solved"] > sft["solved"], (sft, ppo)

    def sampled(rows: list[dict]) -> float:
        return sum(r["score"] for r in rows) / len(rows)

    assert sampled(train[-5:]) >= sampled(train[:5]) + MIN_RISE, [r["score"] for r in train]
    assert max(r["kl"] for r in train) < 5.0  # the KL penalty keeps the policy near the reference


def _held_out_pairs(kind: str, rng: random.Random) -> list[dict]:
    """A fresh wrong answer of `kind` for each of the 200 held-out prompts where it can be
    wrong (an echo of letters that are already in order is the answer: that prompt is left out)."""
    rows = []
    for row in sort_rows("prompts", "eval"):
        letters = row["prompt"].removeprefix("sort ").removesuffix(" =")
        answer = "".join(sorted(letters))
        for _ in range(20):
            wrong = MISTAKES[kind](letters, answer, rng)
            if wrong != answer:
                rows.append({"prompt": row["prompt"], "chosen": " " + answer, "rejected": " " + wrong})
                break
    return rows


def test_reward_model_ranks_the_answer_above_every_kind_of_mistake(work, sft_model):
    """Before the built-in pairs held trailing/foreign/missing-letter negatives, an RM from this
    recipe on a 30-step SFT model ranked a sorted answer with a letter the prompt lacks above
    the exact one on 62% of the held-out prompts, and PPO against it drove the greedy task
    score down (0.45 -> 0.33) while its reward rose."""
    rlhf("rm", "--recipe", str(REPO / "recipes" / "tiny-rm.yaml"), "-o", "rm",
         "--set", f"model.base={sft_model}", "--set", f"train.max_steps={RM_STEPS}",
         "--set", "train.save_every=null", "--set", f"train.eval_every={RM_STEPS}", cwd=work)
    run = work / "rm"
    held_out = [r["accuracy"] for r in read_jsonl(run / "metrics.jsonl") if r.get("split") == "eval"]
    assert held_out[-1] >= 0.9, held_out

    from rlhf_cli.data.preference import build_preference_dataset
    from rlhf_cli.stages.evaluate import pair_scores, preference_report, settings_for
    from rlhf_cli.stages.evaluate.loaded import load_for_eval

    loaded, settings = load_for_eval(str(run)), settings_for(str(run), {})
    rng = random.Random(2024)  # not the data's seeds: fresh mistakes on held-out prompts
    accuracy = {}
    for kind in MISTAKES:
        examples, _ = build_preference_dataset(_held_out_pairs(kind, rng), loaded.tokenizer,
                                               settings.template, settings.max_length,
                                               settings.max_prompt_length, source=kind)
        assert len(examples) >= 190, (kind, len(examples))
        accuracy[kind] = preference_report(*pair_scores(loaded, examples, settings))["accuracy"]
    assert all(accuracy[kind] >= RM_MIN_ACCURACY[kind] for kind in MISTAKES), accuracy

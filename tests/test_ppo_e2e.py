"""PPO end to end through the real CLI (subprocesses: real exit codes, real stderr).

Every shipped tiny arrangement runs two short iterations with the built-in reward
function; 1base-1lora also runs with a reward model from `rlhf rm`; wrong inputs exit 2
with one `error:` line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import REPO, read_jsonl, rlhf

ARRANGEMENTS = ("1base-1lora", "1base-2lora", "2base-2lora", "separate")
# Two small iterations, a small greedy evaluation at the start and the end, no checkpoints.
FAST = ["--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.eval_every=null",
        "--set", "train.save_every=null", "--set", "train.eval_num_prompts=16",
        "--set", "ppo.rollout_batch_size=16", "--set", "ppo.mini_batch_size=8", "--set", "ppo.ppo_epochs=1"]


def recipe(arrangement: str) -> str:
    return str(REPO / "recipes" / f"tiny-ppo-{arrangement}.yaml")


def assert_ppo_run(run: Path, proc: subprocess.CompletedProcess, critic: bool = True) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if r.get("split") != "eval"]
    assert [r["step"] for r in train] == [1, 2]
    for row in train:
        for key in ("score", "kl", "response_length", "loss", "policy_loss", "entropy"):
            assert isinstance(row[key], float), (key, row)
        assert isinstance(row.get("value_loss"), float) == critic, row
    assert train[0]["kl"] == 0.0  # the fresh actor adapter is the reference exactly
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and all(0 <= r["score"] <= 1 for r in evals)
    samples = read_jsonl(run / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 2}
    assert all(isinstance(s["response"], str) and "sort" in s["prompt"] for s in samples)
    return train


def assert_adapter_loads(final: Path, critic: bool = True) -> None:
    """final/ is a PEFT adapter that loads against the base it names, with the tokenizer, and
    the value head beside it when the run trained a critic."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert (final / "value_head.safetensors").is_file() == critic
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(final)).eval()
    assert set(policy.peft_config) == {"default"}
    ids = AutoTokenizer.from_pretrained(str(final))("sort dcba =", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.equal(policy(ids).logits, base(ids).logits)  # two updates moved it


def assert_user_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], proc.stderr


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ppo_e2e")


@pytest.fixture(scope="module")
def rm_run(work) -> Path:
    """A (briefly trained) LoRA reward model on builtin:tiny, through `rlhf rm`."""
    proc = rlhf("rm", "--recipe", str(REPO / "recipes" / "tiny-rm.yaml"), "-o", "rm",
                "--set", "train.max_steps=3", "--set", "train.eval_every=null",
                "--set", "train.save_every=null", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "rm"


@pytest.mark.slow
@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_arrangement_runs_with_the_reward_function(arrangement, work):
    out = f"fn-{arrangement}"
    proc = rlhf("ppo", "--recipe", recipe(arrangement), *FAST, "-o", out, cwd=work)
    assert_ppo_run(work / out, proc)
    assert_adapter_loads(work / out / "final")


@pytest.mark.slow
def test_1base_1lora_with_a_reward_model_drops_long_prompts(work, rm_run):
    # Sort prompts are 8 + n tokens for n letters: at most 13 keeps 3 to 5 letters.
    proc = rlhf("ppo", "--recipe", recipe("1base-1lora"), *FAST, "-o", "rm-1base-1lora",
                "--set", "ppo.reward_fn=null", "--set", f"ppo.reward_model={rm_run}",
                "--set", "data.max_prompt_length=13", cwd=work)
    assert_ppo_run(work / "rm-1base-1lora", proc)
    output = (proc.stdout + proc.stderr).splitlines()
    line = next(line for line in output if line.startswith("data.train:"))
    assert "prompt longer than max_prompt_length" in line and "dropped" in line and "of 2000 rows" in line
    assert_adapter_loads(work / "rm-1base-1lora" / "final")


BAD_REWARDS = """\
def raises(prompts, responses):
    raise ValueError("no score today")


def too_few(prompts, responses):
    return [0.0] * (len(responses) - 1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("function, text", [
    ("raises", "raised ValueError: no score today"),
    ("too_few", "returned 15 scores for 16 responses"),
])
def test_bad_reward_function_is_a_user_error(function, text, work):
    (work / "bad_rewards.py").write_text(BAD_REWARDS)
    proc = rlhf("ppo", "--recipe", recipe("1base-1lora"), *FAST, "-o", f"bad-{function}",
                "--set", f"ppo.reward_fn=bad_rewards.py:{function}",
                "--set", "train.eval_reward_fn=null", cwd=work)
    assert_user_error(proc, text)


@pytest.mark.slow
def test_rm_from_another_base_is_a_user_error(work, rm_run):
    base = json.loads((rm_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    other = work / "other-base"
    if not other.exists():
        shutil.copytree(base, other)
    proc = rlhf("ppo", "--recipe", recipe("1base-2lora"), *FAST, "-o", "bad-base",
                "--set", f"model.base={other}", "--set", "ppo.reward_fn=null",
                "--set", f"ppo.reward_model={rm_run}", cwd=work)
    assert_user_error(proc, "one-base arrangements need the same base")
    assert not (work / "bad-base" / "final").exists()


@pytest.mark.slow
def test_separate_scores_with_a_merged_rm_as_with_its_adapter(work, rm_run):
    """`rlhf merge-lora` of an RM run is a full sequence classifier: `separate` takes it as
    `ppo.reward_model` and scores the first rollout as the adapter does; the one-base
    arrangements, which keep the RM as an adapter on the policy's base, refuse it."""
    merged = work / "rm-merged"
    if not merged.exists():
        proc = rlhf("merge-lora", str(rm_run), "--out", str(merged), cwd=work)
        assert proc.returncode == 0, proc.stderr
    first = {}
    for name, rm in (("adapter", rm_run), ("merged", merged)):
        proc = rlhf("ppo", "--recipe", recipe("separate"), *FAST, "-o", f"sep-rm-{name}",
                    "--set", "ppo.reward_fn=null", "--set", f"ppo.reward_model={rm}", cwd=work)
        first[name] = assert_ppo_run(work / f"sep-rm-{name}", proc)[0]
    assert first["merged"]["response_length"] == first["adapter"]["response_length"]  # same rollout
    assert first["merged"]["score"] == pytest.approx(first["adapter"]["score"], rel=1e-4, abs=1e-5)
    proc = rlhf("ppo", "--recipe", recipe("1base-1lora"), *FAST, "-o", "merged-1base",
                "--set", "ppo.reward_fn=null", "--set", f"ppo.reward_model={merged}", cwd=work)
    assert_user_error(proc, "is a full reward model")


@pytest.mark.slow
def test_every_prompt_too_long_is_a_user_error(work):
    proc = rlhf("ppo", "--recipe", recipe("1base-1lora"), *FAST, "-o", "bad-long",
                "--set", "data.max_prompt_length=6", cwd=work)
    assert_user_error(proc, "dropped 2000 of 2000 rows: 2000 prompt longer than max_prompt_length")


# ------------------------------------------------------------------ advantage estimators
ESTIMATORS = {  # the same 64 responses per iteration: 64 prompts x 1, or 16 prompts x 4
    "gae": ["--set", "ppo.rollout_batch_size=64"],
    "grpo": ["--set", "ppo.rollout_batch_size=16", "--set", "ppo.samples_per_prompt=4"],
    "rloo": ["--set", "ppo.rollout_batch_size=16", "--set", "ppo.samples_per_prompt=4"],
    "reinforce_pp": ["--set", "ppo.rollout_batch_size=16", "--set", "ppo.samples_per_prompt=4"],
}


ESTIMATOR_ITERATIONS = 30


@pytest.fixture(scope="module")
def sft_base(work) -> Path:
    """A 30-step SFT model, merged: it sorts about half the letters right (room to improve)."""
    proc = rlhf("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "-o", "sft",
                "--set", "train.max_steps=30", "--set", "train.warmup_steps=5",
                "--set", "train.eval_every=null", "--set", "train.save_every=null", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = rlhf("merge-lora", "sft", "--out", "sft-merged", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "sft-merged"


@pytest.mark.slow
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_advantage_estimator_raises_the_score(estimator, work, sft_base):
    """30 iterations from the SFT model raise the greedy held-out score by more than 0.05
    with each estimator. Measured with the sampling stream seeded after the models are built:
    grpo +0.11 to +0.16 over seeds 42, 1, 4, 6 at 30 iterations; at 20 it ranged +0.04 to
    +0.13 over seeds 42 and 1-8 (too near the bound; rloo and reinforce_pp +0.11 to +0.15)."""
    out = f"estimator-{estimator}"
    proc = rlhf("ppo", "--recipe", recipe("1base-1lora"), "-o", out, "--set", f"model.base={sft_base}",
                "--set", f"train.max_steps={ESTIMATOR_ITERATIONS}", "--set", "train.eval_every=null",
                "--set", "train.save_every=null", "--set", f"ppo.advantage={estimator}",
                *ESTIMATORS[estimator], cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(work / out / "metrics.jsonl")
    evals = {r["step"]: r["score"] for r in rows if r.get("split") == "eval"}
    assert evals[ESTIMATOR_ITERATIONS] > evals[0] + 0.05, evals
    train = [r for r in rows if r.get("split") != "eval"]
    critic = estimator == "gae"
    for row in train:  # no critic, no critic numbers (not zeros or NaN in their place)
        assert ("value_loss" in row) == critic and ("explained_variance" in row) == critic
        assert ("frac_reward_zero_std" in row) == (estimator in ("grpo", "rloo"))
    assert_adapter_loads(work / out / "final", critic=critic)


@pytest.mark.slow
def test_the_grpo_recipe_runs_as_it_is(work):
    proc = rlhf("ppo", "--recipe", str(REPO / "recipes" / "tiny-grpo.yaml"), *FAST, "-o", "grpo-recipe",
                cwd=work)
    train = assert_ppo_run(work / "grpo-recipe", proc, critic=False)
    assert all(0 <= row["frac_reward_zero_std"] <= 1 for row in train)
    final = work / "grpo-recipe" / "final"  # (on the random base the policy has little to learn)
    assert (final / "adapter_model.safetensors").is_file() and not (final / "value_head.safetensors").exists()


# ------------------------------------------------------------------ DAPO / Dr. GRPO (issue 13)
RLVR_ITERATIONS = 30


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-dapo", "tiny-dr-grpo"])
def test_the_recipes_raise_the_greedy_score_of_the_sft_model(name, work, sft_base):
    """30 iterations of each recipe from the 30-step SFT model raise the greedy held-out
    score by more than 0.05: tiny-dapo 0.453 -> 0.584 (seed 42), 0.567 (seed 1); tiny-dr-grpo
    0.453 -> 0.584 (seed 42), 0.586 (seed 1); 1-3 min each on 2 shared cores."""
    out = f"rlvr-{name}"
    proc = rlhf("ppo", "--recipe", str(REPO / "recipes" / f"{name}.yaml"), "-o", out,
                "--set", f"model.base={sft_base}", "--set", f"train.max_steps={RLVR_ITERATIONS}",
                "--set", "train.eval_every=null", "--set", "train.save_every=null",
                "--set", "train.log_every=1", cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(work / out / "metrics.jsonl")
    evals = {r["step"]: r["score"] for r in rows if r.get("split") == "eval"}
    assert evals[RLVR_ITERATIONS] > evals[0] + 0.05, evals
    train = [r for r in rows if r.get("split") != "eval"]
    assert all(r["kl"] == 0 for r in train)  # kl_coef 0: no reference forward
    if name == "tiny-dapo":
        assert all(16 <= r["prompts_drawn"] <= 48 and r["groups_kept"] <= 16 for r in train)

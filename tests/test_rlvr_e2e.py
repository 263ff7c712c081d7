"""DAPO and Dr. GRPO through the real CLI (slow): a run killed and resumed with every new key
on equals an uninterrupted one, and the tiny recipes raise the greedy held-out score of the
30-step SFT model (test_ppo_e2e.py's `sft_base`)."""

from __future__ import annotations

import subprocess

import pytest
from cli_helpers import REPO, cli_argv, cli_env, complete_checkpoints, read_jsonl, rlhf
from fault_helpers import assert_same_run, wait_for
from test_ppo_e2e import sft_base, work  # noqa: F401  (fixtures: the SFT model, its folder)

# From the random base, as test_ppo_faults.py: 4 prompts x 4 samples an iteration, the ptx
# loss moves the policy (the scores alone barely would), 2 minibatches of 8.
BASE = ["--recipe", str(REPO / "recipes" / "tiny-ppo-1base-1lora.yaml"), "--set", "train.eval_reward_fn=null",
        "--set", "train.eval_every=null", "--set", "train.log_every=1", "--set", "train.lr=1e-3",
        "--set", "ppo.advantage=grpo", "--set", "ppo.samples_per_prompt=4",
        "--set", "ppo.rollout_batch_size=4", "--set", "ppo.mini_batch_size=8", "--set", "ppo.ppo_epochs=1",
        "--set", "ppo.ptx_coef=0.5", "--set", "ppo.ptx_data=builtin:sort"]
DAPO = ["--set", "ppo.clip_range_high=0.28", "--set", "ppo.dynamic_sampling=true",
        "--set", "ppo.max_sampling_rounds=2", "--set", "ppo.overlong=penalty",
        "--set", "ppo.overlong_buffer=6",
        "--set", "ppo.loss_aggregation=seq-mean-token-mean", "--set", "ppo.scale_rewards=batch",
        "--set", "ppo.kl_coef=0"]
DR_GRPO = ["--set", "ppo.scale_rewards=none", "--set", "ppo.loss_aggregation=seq-mean-token-sum-norm",
           "--set", "ppo.overlong=mask", "--set", "ppo.micro_batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("options", [DAPO, DR_GRPO], ids=["dapo", "dr-grpo"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(options, rlhf_home, tmp_path):
    args = ["ppo", *BASE, *options, "--set", "train.max_steps=6", "--set", "train.save_every=1"]
    proc = subprocess.Popen(cli_argv(*args, "-o", "run"), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    wait_for(proc, lambda: (run / "checkpoints" / "step-3" / "trainer_state.json").is_file())
    proc.kill()
    proc.wait()
    killed_at = int(complete_checkpoints(run)[-1].name.split("-")[1])
    assert 3 <= killed_at < 6 and not (run / "final").exists()
    resumed = rlhf(*args, "-o", "run", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(iteration {killed_at})" in resumed.stderr
    straight = rlhf(*args, "-o", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert_same_run(run, tmp_path / "straight")
    rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if r.get("split") != "eval"]
    if options is DAPO:  # dynamic sampling logged every iteration; some took a second round
        assert all(r["prompts_drawn"] == 4 * r["sampling_rounds"] for r in rows)
        assert any(r["sampling_rounds"] == 2 for r in rows), rows
        assert all(r["kl"] == 0 for r in rows)  # no reference: no KL


ITERATIONS = 30


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-dapo", "tiny-dr-grpo"])
def test_the_recipes_raise_the_greedy_score_of_the_sft_model(name, work, sft_base):  # noqa: F811
    """30 iterations of each recipe from the 30-step SFT model raise the greedy held-out
    score by more than 0.05 (figures in the report and the recipes' headers)."""
    out = f"rlvr-{name}"
    proc = rlhf("ppo", "--recipe", str(REPO / "recipes" / f"{name}.yaml"), "-o", out,
                "--set", f"model.base={sft_base}", "--set", f"train.max_steps={ITERATIONS}",
                "--set", "train.eval_every=null", "--set", "train.save_every=null",
                "--set", "train.log_every=1", cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(work / out / "metrics.jsonl")
    evals = {r["step"]: r["score"] for r in rows if r.get("split") == "eval"}
    print(name, evals)
    assert evals[ITERATIONS] > evals[0] + 0.05, evals
    train = [r for r in rows if r.get("split") != "eval"]
    assert all(r["kl"] == 0 for r in train)  # kl_coef 0: no reference forward
    if name == "tiny-dapo":
        assert all(16 <= r["prompts_drawn"] <= 48 and r["groups_kept"] <= 16 for r in train)

"""DAPO and Dr. GRPO through the real CLI (slow): a run killed and resumed with every new key
on equals an uninterrupted one. (That tiny-dapo and tiny-dr-grpo raise the greedy score of the
SFT model: test_ppo_e2e.py, beside the other estimators, to share its SFT model.)"""

from __future__ import annotations

import subprocess

import pytest
from cli_helpers import REPO, cli_argv, cli_env, complete_checkpoints, read_jsonl, rlhf
from fault_helpers import assert_same_run, wait_for

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

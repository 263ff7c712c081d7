"""PPO-max through the real CLI: resume with every trick on equals an uninterrupted run (the
running reward moments ride in the checkpoint), and the tiny PPO-max recipe learns the
built-in task from an SFT model at least as well as the default recipe does."""

from __future__ import annotations

import json
import subprocess

import pytest
from cli_helpers import REPO, cli_argv, cli_env, complete_checkpoints, read_jsonl, rlhf
from fault_helpers import assert_same_run, wait_for
from test_ppo_e2e import sft_base, work  # noqa: F401  (module fixtures: the SFT model to start from)

# From the random base the task's scores are all 0: a reward that varies with the response.
VARIED_REWARD = """\
def varied(prompts, responses):
    return [len(set(r)) / 4.0 - len(r) / 10.0 for r in responses]
"""
TRICKS = ["--set", "ppo.reward_scaling=true", "--set", "ppo.reward_centering=true",
          "--set", "ppo.advantage_clip=0.5", "--set", "ppo.entropy_coef=0.01", "--set", "ppo.dual_clip=3",
          "--set", "ppo.critic_lr=3e-3", "--set", "ppo.critic_adam_eps=1e-6",
          "--set", "ppo.critic_adam_beta2=0.95"]
BASE = ["--recipe", str(REPO / "recipes" / "tiny-ppo-1base-2lora.yaml"), "--set", "train.eval_reward_fn=null",
        "--set", "train.eval_every=null", "--set", "train.log_every=1", "--set", "ppo.rollout_batch_size=8",
        "--set", "ppo.mini_batch_size=4", "--set", "ppo.ppo_epochs=1", "--set", "train.lr=1e-3",
        "--set", "ppo.reward_fn=varied_rewards.py:varied"]


@pytest.mark.slow
def test_resume_with_the_ppo_max_tricks_equals_an_uninterrupted_run(rlhf_home, tmp_path):
    (tmp_path / "varied_rewards.py").write_text(VARIED_REWARD)
    args = ["ppo", *BASE, *TRICKS, "--set", "train.max_steps=6", "--set", "train.save_every=1"]
    proc = subprocess.Popen(cli_argv(*args, "-o", "run"), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    wait_for(proc, lambda: (run / "checkpoints" / "step-3" / "trainer_state.json").is_file())
    proc.kill()
    proc.wait()
    newest = complete_checkpoints(run)[-1]
    killed_at = int(newest.name.split("-")[1])
    assert 3 <= killed_at < 6 and not (run / "final").exists()
    moments = json.loads((newest / "trainer_state.json").read_text())["running_rewards"]
    assert moments["count"] == 8 * killed_at and moments["m2"] > 0  # every score so far, and they varied
    resumed = rlhf(*args, "-o", "run", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(iteration {killed_at})" in resumed.stderr
    straight = rlhf(*args, "-o", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert_same_run(run, tmp_path / "straight")
    rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if r.get("split") != "eval"]
    assert all("reward_running_std" in r and "dual_clip_frac" in r for r in rows)


PPO_MAX_ITERATIONS = 30
LEARNING_SEEDS = (42, 2)
MARGIN = 0.03


def _greedy_scores(out: str, work_dir, sft, recipe: str, seed: int) -> dict[int, float]:
    proc = rlhf("ppo", "--recipe", str(REPO / "recipes" / recipe), "-o", out, "--set", f"model.base={sft}",
                "--set", f"train.max_steps={PPO_MAX_ITERATIONS}", "--set", "train.eval_every=null",
                "--set", "train.save_every=null", "--set", f"train.seed={seed}", cwd=work_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(work_dir / out / "metrics.jsonl")
    return {r["step"]: r["score"] for r in rows if r.get("split") == "eval"}


def _gain(scores: dict[int, float]) -> float:
    return scores[PPO_MAX_ITERATIONS] - scores[0]


@pytest.mark.slow
def test_ppo_max_learns_at_least_as_well_as_the_default(work, sft_base):  # noqa: F811
    """30 iterations of tiny-ppo-max and of the recipe it extends (tiny-ppo-1base-2lora), from
    the same 30-step SFT model, with seeds 42 (the recipes') and 2 (where the earlier recipe
    lagged, 0.612 vs 0.661): PPO-max raises the greedy held-out score at each seed, and its mean
    gain over the two seeds is at least the default's less MARGIN. The mean, not each seed: at
    seed 2 any one trick added to the default, or the default with a different path, ends at
    0.59-0.63 against 0.661 (figures in recipes/tiny-ppo-max.yaml and the closing note); one
    seed moves by ~0.05, two seeds' mean by less. Measured from 0.453: default 0.589 / 0.661,
    PPO-max 0.679 / 0.610."""
    gains: dict[str, list[float]] = {"default": [], "ppo-max": []}
    for seed in LEARNING_SEEDS:
        default = _greedy_scores(f"default-{seed}", work, sft_base, "tiny-ppo-1base-2lora.yaml", seed)
        ppo_max = _greedy_scores(f"ppo-max-{seed}", work, sft_base, "tiny-ppo-max.yaml", seed)
        assert default[0] == ppo_max[0]  # the same start
        print(f"seed {seed}: greedy score default {default}, PPO-max {ppo_max}")
        gains["default"].append(_gain(default))
        gains["ppo-max"].append(_gain(ppo_max))
    assert min(gains["ppo-max"]) > 0.05, gains
    mean = {name: sum(g) / len(g) for name, g in gains.items()}
    assert mean["ppo-max"] >= mean["default"] - MARGIN, gains

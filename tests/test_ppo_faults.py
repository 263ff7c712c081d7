"""PPO runs that stop: Ctrl-C, SIGKILL, NaN/inf updates, a KL explosion; and what a run
with an actor EMA leaves in final/. Through the real CLI where the fault can be made real
(signals), in process with a patched loss where it cannot (a NaN at a chosen update).

Runs start from the random built-in base with the built-in reward function: small rollouts
(8 prompts, one update of 8 responses per iteration), no evaluation, one row per iteration.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess

import pytest
from cli_helpers import REPO, cli_argv, cli_env, complete_checkpoints, error_line, rlhf, same_tensors, weights
from fault_helpers import (
    assert_diverged_then_resumes,
    assert_same_run,
    assert_skipped_step_left_the_state,
    assert_stopped_cleanly,
    ctrl_c_after_two_rows,
    poison,
    start,
    stopped_at,
    train_rows,
    wait_for,
)

RECIPE = str(REPO / "recipes" / "tiny-ppo-1base-1lora.yaml")
BASE = ["--recipe", RECIPE, "--set", "train.eval_reward_fn=null", "--set", "train.eval_every=null",
        "--set", "train.log_every=1", "--set", "train.save_every=null", "--set", "ppo.rollout_batch_size=8",
        "--set", "ppo.mini_batch_size=8", "--set", "ppo.ppo_epochs=1", "--set", "train.lr=1e-3"]
# A critic-free estimator with ptx: from the random base all scores are 0, so the ptx loss is
# what moves the policy (and the KL, and through it the rewards).
GRPO_PTX = ["--set", "ppo.advantage=grpo", "--set", "ppo.samples_per_prompt=4",
            "--set", "ppo.rollout_batch_size=4", "--set", "ppo.mini_batch_size=8",
            "--set", "ppo.ptx_coef=0.5", "--set", "ppo.ptx_data=builtin:sort"]
EMA = ["--set", "ppo.ema_decay=0.8"]


# ------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(rlhf_home, tmp_path):
    args = ["ppo", *BASE, *EMA, "--set", "train.max_steps=24"]
    run = tmp_path / "run"
    stderr = ctrl_c_after_two_rows(start([*args, "-o", "run"], tmp_path), run)
    step, checkpoint, command = stopped_at(stderr, "iteration", 24)
    assert_stopped_cleanly(run, tmp_path / checkpoint, step)
    assert (tmp_path / checkpoint / "ema.safetensors").is_file()

    resumed = rlhf(*shlex.split(command)[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resuming from .*\(iteration {step}\)", resumed.stderr), resumed.stderr
    straight = rlhf(*args, "-o", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert_same_run(run, tmp_path / "straight")


# ------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("options", [EMA, GRPO_PTX + EMA], ids=["gae-ema", "grpo-ptx-ema"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(options, rlhf_home, tmp_path):
    args = ["ppo", *BASE, *options, "--set", "train.max_steps=8", "--set", "train.save_every=1"]
    proc = subprocess.Popen(cli_argv(*args, "-o", "run"), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    wait_for(proc, lambda: (run / "checkpoints" / "step-3" / "trainer_state.json").is_file())
    proc.kill()
    proc.wait()
    newest = complete_checkpoints(run)[-1]
    killed_at = int(newest.name.split("-")[1])
    assert 3 <= killed_at < 8 and not (run / "final").exists()
    resumed = rlhf(*args, "-o", "run", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(iteration {killed_at})" in resumed.stderr
    straight = rlhf(*args, "-o", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert_same_run(run, tmp_path / "straight")
    samples = [json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and len(samples) == 4 * 8  # no iteration written twice


# ------------------------------------------------------------------------------ NaN/inf


def _nan_at(monkeypatch, bad_calls) -> None:
    """A NaN policy loss at the given training updates (1-based; one update per iteration)."""
    from rlhf_cli.stages.ppo import update

    poison(monkeypatch, update, "policy_loss", bad_calls)


def test_a_nan_update_is_skipped_and_counted(in_process, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3})
    code = in_process("ppo", *BASE, "--set", "train.max_steps=5", "--set", "train.save_every=1",
                      "--set", "train.keep_checkpoints=10", "-o", "run")
    assert code == 0
    run = tmp_path / "run"
    rows = {r["step"]: r for r in train_rows(run)}
    assert "bad_steps" not in rows[2] and "policy_loss" in rows[2]
    assert rows[3]["bad_steps"] == 1 and "policy_loss" not in rows[3] and "loss" not in rows[3]
    assert rows[5]["bad_steps"] == 1 and math.isfinite(rows[5]["loss"])
    assert_skipped_step_left_the_state(run, 3)
    # The count is in the checkpoint (the runner's NaN/inf counter, a named part).
    state = json.loads((run / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["bad_steps"] == {"total": 1, "in_a_row": 0}


def test_repeated_nan_updates_stop_the_run_and_keep_the_checkpoint(in_process, tmp_path, monkeypatch, capsys):
    from rlhf_cli.stages.ppo import update

    real_loss = update.policy_loss
    _nan_at(monkeypatch, set(range(3, 100)))
    args = ["ppo", *BASE, "--set", "train.max_steps=6", "--set", "train.save_every=1",
            "--set", "train.max_bad_steps=2", "-o", "run"]
    run = tmp_path / "run"
    error = assert_diverged_then_resumes(in_process, args, run, capsys, "iteration",
                                         heal=lambda: monkeypatch.setattr(update, "policy_loss", real_loss))
    assert "PPO diverged" in error and "2 updates in a row, the last in iteration 4" in error, error
    assert "train.max_bad_steps=2" in error
    assert train_rows(run)[-1]["bad_steps"] == 1  # iteration 3's, carried over by the checkpoint


def test_kl_explosion_still_stops_the_run(in_process, tmp_path, monkeypatch, capsys):
    from rlhf_cli.stages.ppo import guard

    monkeypatch.setattr(guard, "KL_LIMIT", -1.0)  # even the KL of 0 at the start is too much here
    assert in_process("ppo", *BASE, "--set", "train.max_steps=4", "-o", "run") == 2
    error = error_line(capsys.readouterr().err)
    assert error.startswith("error: PPO stopped at iteration 1: KL to the reference exploded (0.0)"), error
    assert "lower train.lr or raise ppo.kl_coef" in error
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # the exploded iteration is not logged


# ------------------------------------------------------------------------------ the EMA


def test_final_holds_the_ema_policy_and_final_online_the_last_weights(in_process, tmp_path):
    """decay 0.5, one update per iteration: final = 0.5·EMA after iteration 1 + 0.5·θ2."""
    code = in_process("ppo", *BASE, "--set", "train.max_steps=2", "--set", "train.save_every=1",
                      "--set", "ppo.ema_decay=0.5", "-o", "run")
    assert code == 0
    run = tmp_path / "run"
    ema1 = weights(run / "checkpoints" / "step-1" / "ema.safetensors")
    online, final = (weights(run / d / "adapter_model.safetensors") for d in ("final-online", "final"))
    # peft saves `base_model.model....lora_A.weight` for `actor.base_model.model....lora_A.default.weight`
    saved_name = {k: k.removeprefix("actor.").replace(".default.", ".") for k in ema1}
    assert set(saved_name.values()) == final.keys() == online.keys()
    for key, name in saved_name.items():
        expected = 0.5 * ema1[key] + 0.5 * online[name]
        assert float((final[name] - expected).abs().max()) <= 1e-7, name
    assert not same_tensors(final, online)
    assert (run / "final" / "value_head.safetensors").is_file()
    assert not (run / "final-online" / "value_head.safetensors").exists()

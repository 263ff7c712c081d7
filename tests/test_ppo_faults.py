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
import signal
import subprocess
import time
from pathlib import Path

import cli_helpers
import pytest
from cli_helpers import REPO, cli_argv, cli_env, complete_checkpoints, error_line, rlhf, same_tensors, weights

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


def train_rows(run: Path) -> list[dict]:
    return cli_helpers.train_rows(run, strict=True)  # a blank line in metrics.jsonl fails too


def machine_figure(key: str) -> bool:
    return key.startswith("time_") or key in ("rss_mb", "cuda_peak_mb")


def assert_same_run(run: Path, straight: Path) -> None:
    """Every logged number (the machine's figures aside: timings, memory) and both saved
    policies equal an uninterrupted run's."""
    rows, expected = train_rows(run), train_rows(straight)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected, strict=True):
        keys = {k for k in want if not machine_figure(k)}
        assert keys == {k for k in row if not machine_figure(k)}, (row, want)
        for key in keys:
            assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (row["step"], key)
    for final in ("final", "final-online"):
        adapter = straight / final / "adapter_model.safetensors"
        if not adapter.exists():
            continue
        a, b = weights(run / final / "adapter_model.safetensors"), weights(adapter)
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, final


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the fault could be made"


# ------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(rlhf_home, tmp_path):
    args = ["ppo", *BASE, *EMA, "--set", "train.max_steps=24"]
    proc = subprocess.Popen(cli_argv(*args, "-o", "run"), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    _wait_for(proc, lambda: (run / "metrics.jsonl").is_file()
              and len((run / "metrics.jsonl").read_text().splitlines()) >= 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    said = re.search(r"interrupted: stopped at iteration (\d+)/24; checkpoint saved in (\S+)\. "
                     r"To continue: (rlhf .+ --resume)$", stderr, re.MULTILINE)
    assert said, stderr
    step = int(said[1])
    assert 2 <= step < 24
    (checkpoint,) = complete_checkpoints(run)
    assert checkpoint == tmp_path / said[2] == run / "checkpoints" / f"step-{step}"
    assert (checkpoint / "ema.safetensors").is_file()
    assert not (run / "final").exists()
    assert [r["step"] for r in train_rows(run)] == list(range(1, step + 1))

    resumed = rlhf(*shlex.split(said[3])[1:], cwd=tmp_path)
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
    _wait_for(proc, lambda: (run / "checkpoints" / "step-3" / "trainer_state.json").is_file())
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

    real, calls = update.policy_loss, [0]

    def policy_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] in bad_calls else loss), stats

    monkeypatch.setattr(update, "policy_loss", policy_loss)


def test_a_nan_update_is_skipped_and_counted(in_process, tmp_path, monkeypatch):
    import torch

    _nan_at(monkeypatch, {3})
    code = in_process("ppo", *BASE, "--set", "train.max_steps=5", "--set", "train.save_every=1",
                      "--set", "train.keep_checkpoints=10", "-o", "run")
    assert code == 0
    run = tmp_path / "run"
    rows = {r["step"]: r for r in train_rows(run)}
    assert "bad_steps" not in rows[2] and "policy_loss" in rows[2]
    assert rows[3]["bad_steps"] == 1 and "policy_loss" not in rows[3] and "loss" not in rows[3]
    assert rows[5]["bad_steps"] == 1 and math.isfinite(rows[5]["loss"])
    step = {n: run / "checkpoints" / f"step-{n}" for n in range(1, 5)}
    # The skipped update left the weights and the optimizer's moments exactly as they were...
    assert same_tensors(weights(step[2] / "trainable.safetensors"),
                        weights(step[3] / "trainable.safetensors"))
    moments = [torch.load(step[n] / "optimizer.pt", weights_only=True)["state"] for n in (2, 3)]
    assert moments[0].keys() == moments[1].keys()
    assert all(same_tensors(moments[0][k], moments[1][k]) for k in moments[0])
    # ...the next one trains again, and the count is in the checkpoint.
    assert not same_tensors(weights(step[3] / "trainable.safetensors"),
                            weights(step[4] / "trainable.safetensors"))
    assert json.loads((step[4] / "trainer_state.json").read_text())["bad_steps"] == 1
    final = weights(run / "final" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


def test_repeated_nan_updates_stop_the_run_and_keep_the_checkpoint(in_process, tmp_path, monkeypatch, capsys):
    from rlhf_cli.stages.ppo import update

    real_loss = update.policy_loss
    _nan_at(monkeypatch, set(range(3, 100)))
    args = ["ppo", *BASE, "--set", "train.max_steps=6", "--set", "train.save_every=1",
            "--set", "train.max_bad_steps=2", "-o", "run"]
    assert in_process(*args) == 2
    error = error_line(capsys.readouterr().err)
    assert "PPO diverged" in error and "2 updates in a row, the last in iteration 4" in error, error
    assert "train.max_bad_steps=2" in error
    run = tmp_path / "run"
    assert f"the newest checkpoint, {Path('run/checkpoints/step-3')}, is kept" in error
    assert not (run / "final").exists()
    # The kept checkpoint is a good one: the run resumes from it and finishes.
    monkeypatch.setattr(update, "policy_loss", real_loss)
    assert in_process(*args, "--resume") == 0
    assert re.search(r"resuming from .*\(iteration 3\)", capsys.readouterr().err)
    assert (run / "final" / "adapter_model.safetensors").is_file()
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

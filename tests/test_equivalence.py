"""Runs that must train identically: accumulation vs. a bigger batch, and resumed vs. not.

Through the real CLI, in fp32 with LoRA dropout 0, so that any difference is arithmetic.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import cli_helpers
import pytest
from cli_helpers import REPO, cli_argv, cli_env, rlhf

RECIPE = REPO / "recipes" / "tiny-sft.yaml"
# Train-only settings: no evaluation, one log row per optimizer step.
QUIET = ["--set", "data.max_length=32", "--set", "train.log_every=1",
         "--set", "train.eval_reward_fn=null", "--set", "train.eval_every=null",
         "--set", "data.eval=null", "--set", "train.save_every=null",
         "--set", "train.warmup_steps=2", "--set", "model.dtype=fp32",
         "--set", "model.lora.dropout=0.0"]


def train_rows(run: Path) -> list[dict]:
    return cli_helpers.train_rows(run, strict=True)  # a blank line in metrics.jsonl fails too


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float):
    import torch

    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diffs.max()) <= atol, f"max |Δw| {float(diffs.max()):.2e}"
    return diffs


@pytest.mark.slow
def test_accumulation_equals_bigger_batch(rlhf_home, tmp_path):
    """1 x 8 (batch x accumulation) and 8 x 1 see the same examples and take the same steps."""
    steps = ["--set", "train.max_steps=4"]
    one_by_eight = rlhf("sft", "--recipe", str(RECIPE), *QUIET, *steps,
                        "--set", "train.batch_size=1", "--set", "train.grad_accum=8",
                        "-o", "a", cwd=tmp_path)
    assert one_by_eight.returncode == 0, one_by_eight.stderr
    eight_by_one = rlhf("sft", "--recipe", str(RECIPE), *QUIET, *steps,
                        "--set", "train.batch_size=8", "--set", "train.grad_accum=1",
                        "-o", "b", cwd=tmp_path)
    assert eight_by_one.returncode == 0, eight_by_one.stderr
    rows_a, rows_b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        # Token-weighted over the whole global batch, whatever the micro-batches' sizes.
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-5)
        assert row_a["grad_norm"] == pytest.approx(row_b["grad_norm"], rel=1e-4)
        assert row_a["lr"] == row_b["lr"]
    # Padding and summation order differ, so gradients agree to ~1e-7 relative; Adam divides
    # by sqrt(v), which magnifies that for the few weights whose gradient is almost zero.
    # Nearly every weight agrees to 1e-6; none is off by a meaningful share of lr (3e-3).
    diffs = assert_same_weights(adapter(tmp_path / "a"), adapter(tmp_path / "b"), atol=1e-4)
    assert float((diffs > 1e-6).float().mean()) < 1e-3


def _logged_past(metrics: Path, step: int) -> bool:
    try:
        return any(f'"step": {later},' in line for line in metrics.read_text().splitlines()
                   for later in range(step + 1, step + 4))
    except FileNotFoundError:
        return False


def _kill_after_checkpoint(args: list[str], cwd: Path, run: Path, step: int) -> bool:
    """Start a run; SIGKILL it once checkpoint `step` exists and a later step was logged.

    Killed mid-training, it leaves metrics rows after the checkpoint that resume must drop.
    Returns whether the kill came before the run finished by itself.
    """
    proc = subprocess.Popen(cli_argv(*args), cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    checkpoint = run / "checkpoints" / f"step-{step}"
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (
                checkpoint.is_dir() and _logged_past(run / "metrics.jsonl", step)):
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert checkpoint.is_dir(), stderr
    return killed


@pytest.mark.slow
def test_resume_equals_uninterrupted(rlhf_home, tmp_path):
    common = ["sft", "--recipe", str(RECIPE), *QUIET, "--set", "train.max_steps=8",
              "--set", "train.save_every=4", "--set", "train.batch_size=16",
              "--set", "train.grad_accum=2"]
    straight = rlhf(*common, "-o", "a", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "b"
    killed = _kill_after_checkpoint([*common, "-o", "b"], tmp_path, run, step=4)
    assert _logged_past(run / "metrics.jsonl", 4)
    if not killed:
        # The run outran the poll and finished: undo what it did after step 4 by hand, so
        # that the resume below still starts from the step-4 checkpoint as after a crash.
        import shutil

        shutil.rmtree(run / "final")
    assert not (run / "final").exists()
    resumed = rlhf(*common, "-o", "b", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "step 4" in resumed.stderr

    rows_a, rows_b = train_rows(tmp_path / "a"), train_rows(run)
    # No duplicated rows from before the kill, and every step logged once.
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == list(range(1, 9))
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-6, abs=1e-7)
        assert row_a["lr"] == pytest.approx(row_b["lr"], rel=1e-9)
    # Same optimizer moments, schedule position and data order: the same weights.
    assert_same_weights(adapter(tmp_path / "a"), adapter(run), atol=1e-6)
    info = json.loads((run / "run.json").read_text())
    assert "resumed_from" in info and info["end_time"]

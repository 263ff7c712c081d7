"""What the fault tests of every stage share (test_faults.py: SFT; test_ppo_faults.py: PPO):
one runner (engine/runner.py) stops, skips, counts and resumes for all of them, so the
faults are made and checked the same way; each file keeps what is its stage's own."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import cli_helpers
import pytest
from cli_helpers import cli_argv, cli_env, complete_checkpoints, error_line, same_tensors, weights

# Figures of the machine, not of the run: they differ between two identical runs.
VOLATILE = ("time_", "rss_mb", "cuda_peak_mb")


def train_rows(run: Path) -> list[dict]:
    return cli_helpers.train_rows(run, strict=True)  # a blank line in metrics.jsonl fails too


def logged_rows(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def start(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(cli_argv(*args), cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the fault could be made"


def ctrl_c_after_two_rows(proc: subprocess.Popen, run: Path, send=None) -> str:
    """Ctrl-C once two rows are logged; the run must exit 130 without a traceback. Its stderr."""
    wait_for(proc, lambda: logged_rows(run) >= 2)
    (send or proc.send_signal)(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    return stderr


def stopped_at(stderr: str, unit: str, total: int) -> tuple[int, str, str]:
    """(step, checkpoint, command to continue) from the line an interrupted run prints."""
    said = re.search(rf"interrupted: stopped at {unit} (\d+)/{total}; checkpoint saved in (\S+)\. "
                     r"To continue: (rlhf .+ --resume)$", stderr, re.MULTILINE)
    assert said, stderr
    step = int(said[1])
    assert 2 <= step < total
    return step, said[2], said[3]


def assert_stopped_cleanly(run: Path, checkpoint: Path, step: int) -> None:
    """The checkpoint of the last completed step, complete, and nothing after it."""
    assert complete_checkpoints(run) == [checkpoint] == [run / "checkpoints" / f"step-{step}"]
    assert not (run / "final").exists()
    assert [r["step"] for r in train_rows(run)] == list(range(1, step + 1))


def poison(monkeypatch, module, name: str, bad_calls, counted=lambda *args: True) -> None:
    """`module.name` returns a NaN loss (its first result × NaN) at the given counted calls (1-based)."""
    real, calls = getattr(module, name), [0]

    def poisoned(*args, **kwargs):
        loss, *rest = real(*args, **kwargs)
        if counted(*args):
            calls[0] += 1
            if calls[0] in bad_calls:
                loss = loss * float("nan")
        return (loss, *rest)

    monkeypatch.setattr(module, name, poisoned)


def assert_skipped_step_left_the_state(run: Path, bad: int) -> None:
    """Checkpoints every step: the skipped step `bad` left the weights and the optimizer's
    moments exactly as they were, the next good step trained again."""
    import torch

    step = {n: run / "checkpoints" / f"step-{n}" for n in (bad - 1, bad, bad + 1)}
    assert same_tensors(weights(step[bad - 1] / "trainable.safetensors"),
                        weights(step[bad] / "trainable.safetensors"))
    moments = [torch.load(step[n] / "optimizer.pt", weights_only=True)["state"] for n in (bad - 1, bad)]
    assert moments[0].keys() == moments[1].keys()
    assert all(same_tensors(moments[0][k], moments[1][k]) for k in moments[0])
    assert not same_tensors(weights(step[bad] / "trainable.safetensors"),
                            weights(step[bad + 1] / "trainable.safetensors"))
    final = weights(run / "final" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


def assert_diverged_then_resumes(in_process, args: list[str], run: Path, capsys, unit: str, heal) -> str:
    """NaN/inf steps from step 3 on and max_bad_steps=2, checkpoints every step: the run stops
    with one error line that names step 3's checkpoint, which holds good weights; after
    `heal()` the run resumes from it and finishes. The error line, for the stage's words."""
    assert in_process(*args) == 2
    error = error_line(capsys.readouterr().err)
    assert f"the newest checkpoint, {Path('run/checkpoints/step-3')}, is kept" in error
    assert not (run / "final").exists()
    heal()
    assert in_process(*args, "--resume") == 0
    assert re.search(rf"resuming from .*\({unit}\s+3\)", capsys.readouterr().err)
    assert (run / "final" / "adapter_model.safetensors").is_file()
    return error


def assert_same_run(run: Path, straight: Path) -> None:
    """Every logged number (the machine's figures aside) and both saved policies equal an
    uninterrupted run's."""
    rows, expected = train_rows(run), train_rows(straight)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected, strict=True):
        keys = {k for k in want if not k.startswith(VOLATILE)}
        assert keys == {k for k in row if not k.startswith(VOLATILE)}, (row, want)
        for key in keys:
            assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (row["step"], key)
    for final in ("final", "final-online"):
        adapter = straight / final / "adapter_model.safetensors"
        if not adapter.exists():
            continue
        a, b = weights(run / final / "adapter_model.safetensors"), weights(adapter)
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, final

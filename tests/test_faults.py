"""Faults during training: Ctrl-C, NaN/inf steps, a full disk, SIGKILL while checkpointing,
and data or runs bigger than memory. Through the real CLI where a fault can be made real
(signals, file-size limits, an exploding learning rate); in-process with a patched loss
or writer where it cannot (a NaN at one chosen step, "No space left on device")."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import resource
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, cli_argv, cli_env, complete_checkpoints, error_line, rlhf, weights
from fault_helpers import (
    assert_diverged_then_resumes,
    assert_skipped_step_left_the_state,
    assert_stopped_cleanly,
    ctrl_c_after_two_rows,
    poison,
    start,
    stopped_at,
    train_rows,
)

RECIPE = str(REPO / "recipes" / "tiny-sft.yaml")
# Short steps, no evaluation, one log row per step; fp32 with LoRA dropout 0 (the recipe's).
BASE = ["--recipe", RECIPE, "--set", "data.max_length=32", "--set", "train.batch_size=4",
        "--set", "train.log_every=1", "--set", "train.eval_reward_fn=null",
        "--set", "train.eval_every=null", "--set", "data.eval=null",
        "--set", "train.save_every=null"]


# ------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(rlhf_home, tmp_path):
    args = ["sft", *BASE, "--set", "train.max_steps=40"]
    run = tmp_path / "run"
    stderr = ctrl_c_after_two_rows(start([*args, "-o", "run"], tmp_path), run)
    step, checkpoint, command = stopped_at(stderr, "step", 40)
    assert_stopped_cleanly(run, tmp_path / checkpoint, step)

    # The command it suggests continues the run, exactly as if it had not stopped.
    resumed = rlhf(*shlex.split(command)[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resuming from .*\(step\s+{step}\)", resumed.stderr), resumed.stderr
    straight = rlhf(*args, "-o", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    rows, straight_rows = train_rows(run), train_rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == list(range(1, 41))
    for row, expected in zip(rows, straight_rows, strict=True):
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7)
    adapter = "final/adapter_model.safetensors"
    a, b = weights(run / adapter), weights(tmp_path / "straight" / adapter)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_in_a_two_process_run_saves_on_both_ranks(rlhf_home, tmp_path):
    """A terminal's Ctrl-C reaches rlhf and torchrun (one process group); torchrun forwards it
    to the workers, which agree on the step to stop at and save it together."""
    proc = start(["sft", *BASE, "--set", "train.max_steps=200", "--set", "train.batch_size=2",
                  "--set", "launch.num_processes=2", "-o", "run"], tmp_path, start_new_session=True)
    run = tmp_path / "run"
    stderr = ctrl_c_after_two_rows(proc, run, send=lambda sig: os.killpg(proc.pid, sig))
    said = re.findall(r"interrupted: stopped at step (\d+)/200; checkpoint saved in (\S+)\.", stderr)
    assert len(said) == 1, stderr  # printed by rank 0 only
    (checkpoint,) = complete_checkpoints(run)
    assert checkpoint == tmp_path / said[0][1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == int(said[0][0])


# ------------------------------------------------------------------------------ NaN/inf


def _nan_at(monkeypatch, bad_steps) -> None:
    """Make the SFT loss NaN at the given training steps (1-based; one micro-batch a step)."""
    from rlhf_cli.stages import sft

    poison(monkeypatch, sft, "sft_loss", bad_steps, counted=lambda model, batch: model.training)


def test_a_nan_step_is_skipped_and_counted(in_process, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3, 5})
    code = in_process("sft", *BASE, "--set", "train.max_steps=6", "--set", "train.save_every=1",
                      "--set", "train.keep_checkpoints=10", "-o", "run")
    assert code == 0
    run = tmp_path / "run"
    rows = {r["step"]: r for r in train_rows(run)}
    assert "loss" not in rows[3] and rows[3]["skipped_steps"] == 1
    assert "skipped_steps" not in rows[2]
    assert rows[6]["skipped_steps"] == 2 and math.isfinite(rows[6]["loss"])
    # The schedule still moved on at the skipped step: lr is a function of the step number
    # (the recipe warms up linearly to 3e-3 over 20 steps).
    assert rows[4]["lr"] == pytest.approx(3e-3 * 4 / 20)
    assert_skipped_step_left_the_state(run, 3)


def test_repeated_nan_steps_stop_the_run_and_keep_the_checkpoint(in_process, tmp_path,
                                                                  monkeypatch, capsys):
    from rlhf_cli.stages import sft

    real_loss = sft.sft_loss
    _nan_at(monkeypatch, set(range(3, 100)))
    args = ["sft", *BASE, "--set", "train.max_steps=6", "--set", "train.save_every=1",
            "--set", "train.max_bad_steps=2", "-o", "run"]
    error = assert_diverged_then_resumes(in_process, args, tmp_path / "run", capsys, "step",
                                         heal=lambda: monkeypatch.setattr(sft, "sft_loss", real_loss))
    assert "training diverged" in error and "steps 3-4" in error, error
    assert "max_bad_steps=2" in error


@pytest.mark.slow
def test_exploding_lr_stops_with_one_error_line(rlhf_home, tmp_path):
    """lr=1e30: the first update makes the weights huge, every later loss is NaN/inf."""
    proc = rlhf("sft", *BASE, "--set", "train.max_steps=10", "--set", "train.lr=1e30",
                "--set", "train.warmup_steps=0", "--set", "train.save_every=1", "-o", "run",
                cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    error = error_line(proc.stderr)
    assert "training diverged" in error and "steps 2-4" in error, error
    rows = train_rows(tmp_path / "run")
    assert rows[-1]["skipped_steps"] == 2  # steps 2 and 3 logged; 4 stopped the run
    assert complete_checkpoints(tmp_path / "run")
    assert not (tmp_path / "run" / "final").exists()


# ---------------------------------------------------------------------- disk full / no room


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(in_process, tmp_path,
                                                                     monkeypatch, capsys):
    from rlhf_cli.engine import backend

    real_save, calls = backend.save_file, [0]

    def full_disk(tensors, filename, *rest, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *rest, **kwargs)

    monkeypatch.setattr(backend, "save_file", full_disk)
    args = ["sft", *BASE, "--set", "train.max_steps=6", "--set", "train.save_every=2", "-o", "run"]
    assert in_process(*args) == 2
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    assert error_line(capsys.readouterr().err) == (
        f"error: cannot write checkpoint to {Path('run/checkpoints/step-4')}: No space left on "
        f"device; the previous checkpoint {Path('run/checkpoints/step-2')} is kept")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]  # no .tmp-step-4 left
    assert not (run / "final").exists()
    monkeypatch.setattr(backend, "save_file", real_save)
    assert in_process(*args, "--resume") == 0
    assert re.search(r"resuming from .*\(step\s+2\)", capsys.readouterr().err)
    assert (run / "final" / "adapter_model.safetensors").is_file()


def test_a_damaged_checkpoint_is_one_error_line(in_process, tmp_path, capsys):
    args = ["sft", *BASE, "--set", "train.max_steps=4", "--set", "train.save_every=1", "-o", "run"]
    assert in_process(*args) == 0
    newest = tmp_path / "run" / "checkpoints" / "step-3"
    tensors = newest / "trainable.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])  # cut short, e.g. by a bad disk
    capsys.readouterr()
    assert in_process(*args, "--resume") == 2
    error = error_line(capsys.readouterr().err)
    assert error.startswith(f"error: cannot load checkpoint {Path('run/checkpoints/step-3')}: ")
    assert "move it away" in error
    newest.rename(newest.with_name("damaged-step-3"))  # as the message says: the older one
    assert in_process(*args, "--resume") == 0
    assert re.search(r"resuming from .*\(step\s+2\)", capsys.readouterr().err)


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "final"])
def test_real_write_failure_is_one_error_line(what, rlhf_home, tmp_path):
    """RLIMIT_FSIZE: every file above 256 KiB fails with EFBIG ("File too large"), a real
    error from the kernel through torch and safetensors (chmod cannot do this for root)."""
    from rlhf_cli.builtin.model import materialize

    materialize("tiny")  # the built-in model's weights are larger than the limit
    save = ["--set", "train.save_every=2"] if what == "checkpoint" else []
    proc = rlhf("sft", *BASE, "--set", "train.max_steps=3", *save, "-o", "run", cwd=tmp_path,
                preexec_fn=_limit_file_size(256 * 1024))
    assert proc.returncode == 2, proc.stderr
    error = error_line(proc.stderr)
    run = tmp_path / "run"
    if what == "checkpoint":
        assert error == (f"error: cannot write checkpoint to {Path('run/checkpoints/step-2')}: "
                         "File too large; there is no earlier checkpoint")
        assert list((run / "checkpoints").iterdir()) == []
    else:
        assert error.startswith("error: cannot write to run") and error.endswith("File too large")
    assert not (run / "final").exists()


def test_metrics_write_failure_names_the_file(tmp_path):
    from rlhf_cli.engine.metrics import MetricsLogger
    from rlhf_cli.errors import UserError

    (tmp_path / "metrics.jsonl").mkdir()  # any OSError will do
    logger = MetricsLogger(tmp_path, enabled=True, report_to=[])
    with pytest.raises(UserError, match=r"cannot write metrics to .*metrics\.jsonl: Is a directory"):
        logger.log({"step": 1, "loss": 1.0})


# ------------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_while_checkpointing_never_leaves_a_checkpoint_resume_cannot_load(
        rlhf_home, tmp_path):
    """Five kills at random moments of a run that checkpoints every step: each time,
    `--resume` either finishes the run or says there is nothing to resume."""
    rng = random.Random(0)
    args = ["sft", *BASE, "--set", "train.max_steps=25", "--set", "train.save_every=1",
            "--set", "train.log_every=5"]
    outcomes = []
    for trial in range(5):
        name = f"run{trial}"
        run = tmp_path / name
        proc = subprocess.Popen(cli_argv(*args, "-o", name), cwd=tmp_path, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        # From the start of the first checkpoint on, most of the time goes to checkpointing.
        while proc.poll() is None and time.monotonic() < deadline and not (
                run / "checkpoints").is_dir():
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        for checkpoint in complete_checkpoints(run):  # complete means complete
            names = {p.name for p in checkpoint.iterdir()}
            assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt",
                    "rng-rank0.pt"} <= names, (checkpoint, names)
        resumed = rlhf(*args, "-o", name, "--resume", cwd=tmp_path)
        if resumed.returncode == 0:
            assert (run / "final" / "adapter_model.safetensors").is_file()
            assert [r["step"] for r in train_rows(run)] == list(range(5, 26, 5))
            outcomes.append("resumed")
        else:
            assert resumed.returncode == 2, resumed.stderr
            assert "no complete checkpoint to resume from" in error_line(resumed.stderr)
            assert not complete_checkpoints(run)
            outcomes.append("nothing to resume")
    assert "resumed" in outcomes, outcomes


# ------------------------------------------------------------------- bigger than memory


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@pytest.mark.slow
def test_a_million_row_jsonl_is_indexed_not_loaded(tmp_path):
    import gc
    import tracemalloc

    from rlhf_cli.data.files import load_rows

    n = 1_000_000
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for start in range(0, n, 10_000):
            handle.write("".join(json.dumps({"prompt": f"sort {i:07d} =", "response": f" {i}"})
                                 + "\n" for i in range(start, start + 10_000)))
    # What the rows would take as dicts: 10,000 of them, measured, times 100.
    tracemalloc.start()
    sample = [json.loads(line) for line, _ in zip(path.open(), range(10_000), strict=False)]
    parsed_size = tracemalloc.get_traced_memory()[0] * (n // len(sample))
    tracemalloc.stop()
    del sample
    gc.collect()
    before = _rss()
    rows = load_rows(str(path))
    grown = _rss() - before
    assert len(rows) == n
    # ~16 bytes a row of index (16 MB) against ~400 MB of dicts.
    assert grown < 48 * 2**20 and grown < parsed_size / 8, (grown / 2**20, parsed_size / 2**20)
    assert rows[654_321] == {"prompt": "sort 0654321 =", "response": " 654321"}
    assert rows[-1]["response"] == f" {n - 1}"
    assert rows.locations[654_321] == f"{path}:654322"
    head = rows[:3]
    assert head == [rows[0], rows[1], rows[2]] and head.locations[2] == f"{path}:3"


@pytest.mark.slow
def test_memory_is_flat_over_a_thousand_steps(rlhf_home, tmp_path):
    proc = rlhf("sft", *BASE, "--set", "train.max_steps=1000", "--set", "train.log_every=100",
                "-o", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rss = {r["step"]: r["rss_mb"] for r in train_rows(tmp_path / "run")}
    assert sorted(rss) == list(range(100, 1001, 100))
    assert rss[1000] - rss[100] < 50, rss


def test_a_state_dict_mismatch_names_its_first_key(tmp_path):
    """torch's load_state_dict error starts with "Error(s) in loading state_dict for X:" alone: the
    line must go on to the first missing or unexpected key."""
    import torch

    from rlhf_cli.engine.checkpoint import load_checkpoint
    from rlhf_cli.errors import UserError

    class Backend:
        rank = 0

        def load_state(self, directory):
            torch.nn.Linear(2, 2).load_state_dict({"weight": torch.zeros(2, 2), "bias": torch.zeros(2),
                                                   "weight.absmax": torch.zeros(1)})

    with pytest.raises(UserError) as raised:
        load_checkpoint(Backend(), tmp_path, scheduler=None)
    assert 'Error(s) in loading state_dict for Linear: Unexpected key(s) in state_dict: "weight.absmax"' \
        in str(raised.value)

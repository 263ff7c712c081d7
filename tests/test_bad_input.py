"""Wrong input through the real CLI: exit status 2, one `error:` line that says where, no
traceback, and nothing trained or overwritten."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_helpers import rlhf

GOOD = """\
stage: sft
model:
  base: builtin:tiny
  lora:
    r: 4
data:
  train: data.jsonl
  max_length: 32
train:
  batch_size: 1
  max_steps: 1
  eval_reward_fn: null
"""
# PPO on two processes: a wrong reward model must be caught before any worker starts.
PPO = """\
stage: ppo
model:
  base: builtin:tiny
  lora:
    r: 4
data:
  train: builtin:sort
  max_length: 32
train:
  max_steps: 1
  eval_reward_fn: null
ppo:
  reward_model: rm
launch:
  num_processes: 2
"""
ROWS = [{"prompt": "sort cba =", "response": " abc"}, {"prompt": "sort fed =", "response": " def"}]
DATA = "".join(json.dumps(row) + "\n" for row in ROWS)

# id -> (files to write: name -> text, argv, a substring the error line must contain)
# Files not named keep GOOD (as r.yaml) and DATA (as data.jsonl).
CASES = {
    "broken yaml": ({"r.yaml": GOOD + "  lr: [0.1\n"}, ["sft", "-r", "r.yaml"],
                    "r.yaml:13: invalid YAML: expected ',' or ']'"),
    "unknown key": ({"r.yaml": GOOD + "  lrr: 0.1\n"}, ["sft", "-r", "r.yaml"],
                    "r.yaml:13: train.lrr: unknown key `train.lrr`; did you mean `lr`?"),
    "wrong type": ({"r.yaml": GOOD.replace("batch_size: 1", "batch_size: one")},
                   ["sft", "-r", "r.yaml"], "r.yaml:10: train.batch_size: expected int"),
    "negative lr": ({}, ["sft", "-r", "r.yaml", "--set", "train.lr=-1e-4"],
                    "--set train.lr: must be > 0"),
    "zero batch size": ({"r.yaml": GOOD.replace("batch_size: 1", "batch_size: 0")},
                        ["sft", "-r", "r.yaml"], "r.yaml:10: train.batch_size: must be >= 1"),
    "unknown --set key": ({}, ["sft", "-r", "r.yaml", "--set", "dpo.betta=0.2"],
                          "did you mean `beta`?"),
    "recipe for another stage": ({"r.yaml": GOOD.replace("stage: sft", "stage: dpo")},
                                 ["sft", "-r", "r.yaml"], "r.yaml:1: stage: this recipe is for "
                                 "stage `dpo`, not `sft`"),
    "missing recipe": ({}, ["sft", "-r", "nope.yaml"], "recipe not found: nope.yaml"),
    "missing data file": ({}, ["sft", "-r", "r.yaml", "--set", "data.train=gone.jsonl"],
                          "data.train: data file not found: gone.jsonl"),
    "malformed json line": ({"data.jsonl": DATA + '{"prompt": "sort ba =", "response": \n'},
                            ["sft", "-r", "r.yaml"], "data.jsonl:3: malformed JSON"),
    "missing fields": ({"data.jsonl": DATA + '{"question": "q", "answer": "a"}\n'},
                       ["sft", "-r", "r.yaml"], "data.jsonl:3: expected fields"),
    "empty data file": ({"data.jsonl": ""}, ["sft", "-r", "r.yaml"], "data.jsonl: no rows"),
    "every row too long": ({}, ["sft", "-r", "r.yaml", "--set", "data.max_length=4"],
                           "data.jsonl was dropped (dropped 2 of 2 rows"),
    "missing model dir": ({}, ["sft", "-r", "r.yaml", "--set", "model.base=./nope"],
                          "model.base: model not found: ./nope"),
    "merge-lora on a non-adapter": ({}, ["merge-lora", ".", "--out", "merged"],
                                    "no adapter_config.json"),
    "unknown cli option": ({}, ["sft", "-r", "r.yaml", "--epochs", "3"], "--epochs"),
    "resume with nothing to resume": ({}, ["sft", "-r", "r.yaml", "-o", "fresh", "--resume"],
                                      "no complete checkpoint to resume from in fresh"),
    "missing reward model": ({"p.yaml": PPO}, ["ppo", "-r", "p.yaml"],
                             "ppo.reward_model: reward model not found: rm"),
    "reward model that is an SFT adapter": (
        {"p.yaml": PPO, "rm/adapter_config.json": '{"task_type": "CAUSAL_LM"}'},
        ["ppo", "-r", "p.yaml"], "/rm is not a reward model: its adapter is a CAUSAL_LM adapter"),
    "reward model that is a causal LM": (
        {"p.yaml": PPO, "rm/config.json": '{"architectures": ["LlamaForCausalLM"]}'},
        ["ppo", "-r", "p.yaml"], "/rm is not a reward model: its architectures are ['LlamaForCausalLM']"),
    "reward model run without final/": (
        {"p.yaml": PPO, "rm/metrics.jsonl": "{\"step\": 1}\\n"}, ["ppo", "-r", "p.yaml"],
        "/rm holds no reward model: no final/adapter_config.json or config.json"),
}


def setup_files(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in {"r.yaml": GOOD, "data.jsonl": DATA, **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)


def assert_user_error(proc: subprocess.CompletedProcess, expected: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, rlhf_home, tmp_path):
    files, argv, expected = CASES[case]
    setup_files(tmp_path, files)
    proc = rlhf(*argv, cwd=tmp_path)
    assert_user_error(proc, expected)
    assert "launching:" not in proc.stderr  # caught before any worker process started
    assert not list(tmp_path.rglob("final")), "something was trained"
    assert not list(tmp_path.rglob("checkpoints"))


def test_finished_run_is_left_untouched(tmp_path):
    setup_files(tmp_path, {})
    run = tmp_path / "done"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text(GOOD)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    proc = rlhf("sft", "-r", "r.yaml", "-o", "done", cwd=tmp_path)
    assert_user_error(proc, "output directory done already holds a run")
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before
    # A finished run has nothing to resume either, and stays as it was.
    proc = rlhf("sft", "-r", "r.yaml", "-o", "done", "--resume", cwd=tmp_path)
    assert_user_error(proc, "already finished")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before


def test_debug_shows_the_traceback(tmp_path):
    setup_files(tmp_path, {"r.yaml": GOOD + "  lrr: 0.1\n"})
    proc = rlhf("sft", "-r", "r.yaml", "--debug", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr
    assert "unknown key `train.lrr`" in proc.stderr
    proc = rlhf("sft", "-r", "r.yaml", cwd=tmp_path, debug=True)  # RLHF_DEBUG=1
    assert "Traceback" in proc.stderr


@pytest.mark.slow
def test_run_that_failed_on_its_data_can_be_rerun(rlhf_home, tmp_path):
    """A run stopped by bad data trained nothing: fixing the data and re-running just works."""
    setup_files(tmp_path, {"data.jsonl": ""})
    assert_user_error(rlhf("sft", "-r", "r.yaml", "-o", "run", cwd=tmp_path), "no rows")
    (tmp_path / "data.jsonl").write_text(DATA)
    proc = rlhf("sft", "-r", "r.yaml", "-o", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_resume_refuses_changed_keys(tmp_path):
    """--resume continues the recorded run; an override it would silently ignore is an error."""
    from rlhf_cli.config import dump_recipe, load_recipe

    setup_files(tmp_path, {})
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "checkpoints" / "step-1" / "trainer_state.json").write_text('{"step": 1}')
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe(tmp_path / "r.yaml", stage="sft",
                                                             output_dir="run")))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = rlhf("sft", "-r", "r.yaml", "-o", "run", "--resume", "--set", "train.lr=0.1",
                "--set", "train.max_steps=5", cwd=tmp_path)
    line = assert_user_error(proc, "--resume continues the run recorded in")
    assert "train.lr (0.0002 -> 0.1)" in line and "train.max_steps (1 -> 5)" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

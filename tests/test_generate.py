"""`rlhf generate`: rows, judges, bad input, and resume after a kill (every prompt once).

The fast tests run the command in this process (`in_process`) on a LoRA "run" built here the
way `rlhf sft` leaves one (recipe.yaml, final/ adapter + tokenizer, the adapter's B random so
the policy is not its base). The slow ones use a real SFT run, two gloo ranks, and SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, cli_argv, cli_env, error_line, read_jsonl, rlhf

from rlhf_cli.builtin.tasks import sort_reward
from rlhf_cli.config import dump_recipe, load_recipe
from rlhf_cli.data.loaders import load_prompts
from rlhf_cli.engine.rollout import sampling_settings
from rlhf_cli.models.policy import policy_model, tokenizer_for

PROMPTS = "builtin:sort:train:7"
SORT = "rlhf_cli.builtin.tasks:sort_reward"


@pytest.fixture(scope="module")
def lora_run(rlhf_home, tmp_path_factory) -> Path:
    recipe = load_recipe(REPO / "recipes" / "tiny-sft.yaml")
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    model = policy_model(recipe, announce=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    run = tmp_path_factory.mktemp("sft_run")
    model.save_pretrained(str(run / "final"))
    tokenizer.save_pretrained(str(run / "final"))
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    return run


def generate_args(run: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(run), "--data", PROMPTS, "--n", "3", "--max-new-tokens", "8",
            "--batch-size", "2", "--out", str(out), *extra]


def sort_prompts(spec: str = PROMPTS):
    """The prompts as PPO reads them for the SFT recipe, with room for 8 new tokens."""
    recipe = load_recipe(REPO / "recipes" / "tiny-sft.yaml", [f"data.train={spec}", "ppo.max_new_tokens=8"])
    tokenizer = tokenizer_for(recipe)
    return load_prompts(recipe, tokenizer, type("B", (), {"is_main": False})()), recipe, tokenizer


def prompt_texts(spec: str = PROMPTS) -> list[str]:
    prompts = sort_prompts(spec)[0]
    return [prompts[i]["prompt"] for i in range(len(prompts))]


def test_rows_hold_k_responses_and_their_scores_in_prompt_order(in_process, lora_run, tmp_path):
    out = tmp_path / "samples.jsonl"
    assert in_process(*generate_args(lora_run, out, "--reward-fn", SORT)) == 0
    rows = read_jsonl(out, strict=True)
    assert [r["prompt"] for r in rows] == prompt_texts()
    for row in rows:
        assert set(row) == {"prompt", "responses", "scores"}
        assert len(row["responses"]) == 3
        # float32, as every judge scores (engine/judge.py)
        assert row["scores"] == pytest.approx(sort_reward([row["prompt"]] * 3, row["responses"]), rel=1e-6)
    assert not (tmp_path / "samples.jsonl.parts").exists()


def test_a_lora_run_samples_base_plus_adapter(in_process, lora_run, tmp_path):
    """The first batch's responses are what transformers' generate gives on base + adapter
    with the same seed and settings; the base alone answers otherwise."""
    from peft import PeftModel

    from rlhf_cli.models.loading import load_causal_lm

    out = tmp_path / "s.jsonl"
    assert in_process(*generate_args(lora_run, out)) == 0
    rows = read_jsonl(out)
    assert all(set(r) == {"prompt", "responses"} for r in rows)
    prompts, recipe, tokenizer = sort_prompts()
    settings = type("S", (), {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8})()
    ids = [prompts[i]["prompt_input_ids"] for i in (0, 0, 0, 1, 1, 1)]  # batch [0, 1], n = 3
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])

    def first_batch(lm) -> list[str]:
        torch.manual_seed(0)
        tokens = lm.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling_settings(settings))[:, width:]
        cut = [t[: t.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in t else t
               for t in tokens.tolist()]
        return tokenizer.batch_decode(cut, skip_special_tokens=True)

    base = load_causal_lm(recipe.model).eval()
    expected = first_batch(PeftModel.from_pretrained(base, str(lora_run / "final")).eval())
    assert rows[0]["responses"] + rows[1]["responses"] == expected
    assert first_batch(load_causal_lm(recipe.model).eval()) != expected


STOPPING_FN = """
import os
from rlhf_cli.builtin.tasks import sort_reward
CALLS = [0]
def score(prompts, responses):
    CALLS[0] += 1
    if CALLS[0] == int(os.environ.get("STOP_AT_CALL", "0")):
        raise KeyboardInterrupt
    return sort_reward(prompts, responses)
"""


def test_a_killed_run_resumes_with_every_prompt_once(in_process, lora_run, tmp_path, monkeypatch):
    fn = tmp_path / "stopping.py"
    fn.write_text(STOPPING_FN)
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    assert in_process(*generate_args(lora_run, whole, "--reward-fn", f"{fn}:score")) == 0

    monkeypatch.setenv("STOP_AT_CALL", "3")  # Ctrl-C while the 3rd batch (prompts 4, 5) is judged
    assert in_process(*generate_args(lora_run, out, "--reward-fn", f"{fn}:score")) == 130
    parts = tmp_path / "out.jsonl.parts"
    assert not out.exists()
    assert [r["index"] for r in read_jsonl(parts / "rank0.jsonl")] == [0, 1, 2, 3]
    with open(parts / "rank0.jsonl", "ab") as handle:  # and a kill in the middle of a write
        handle.write(b'{"index": 4, "prompt": "sort')

    monkeypatch.delenv("STOP_AT_CALL")
    assert in_process(*generate_args(lora_run, out, "--reward-fn", f"{fn}:score")) == 2  # no --resume
    assert in_process(*generate_args(lora_run, out, "--reward-fn", f"{fn}:score", "--resume")) == 0
    rows = read_jsonl(out, strict=True)
    assert [r["prompt"] for r in rows] == prompt_texts()  # each once, in order
    assert rows == read_jsonl(whole)  # same batches, same seeds: as if never stopped
    assert not parts.exists()
    assert in_process(*generate_args(lora_run, out, "--reward-fn", f"{fn}:score", "--resume")) == 0


def test_resume_refuses_changed_settings(in_process, lora_run, tmp_path, monkeypatch, capsys):
    fn = tmp_path / "stopping.py"
    fn.write_text(STOPPING_FN)
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("STOP_AT_CALL", "1")
    assert in_process(*generate_args(lora_run, out, "--reward-fn", f"{fn}:score")) == 130
    capsys.readouterr()
    assert in_process(*generate_args(lora_run, out, "--reward-fn", f"{fn}:score", "--resume",
                                     "--temperature", "0.5")) == 2
    assert "changes temperature" in error_line(capsys.readouterr().err)


BAD = [
    (["--n", "0"], "--n: must be at least 1"),
    (["--reward-fn", SORT, "--reward-model", "x"], "give one judge"),
    (["--top-p", "0"], "--top-p"),
    (["--data", "missing.jsonl"], "--data: not found: missing.jsonl"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_settings_are_one_error_line_and_write_nothing(in_process, lora_run, tmp_path, capsys,
                                                           extra, message):
    out = tmp_path / "out.jsonl"
    assert in_process(*generate_args(lora_run, out, *extra)) == 2
    assert message in error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_missing_out_or_model_is_an_error(in_process, lora_run, tmp_path, capsys):
    assert in_process("generate", "--model", str(lora_run), "--data", PROMPTS) == 2
    assert "--out" in error_line(capsys.readouterr().err)
    assert in_process("generate", "--model", "no-such-run", "--data", PROMPTS, "--out", "o.jsonl") == 2
    assert "--model: not found: no-such-run" in error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("body,message", [
    ("return [0.5] * (len(responses) - 1)", "returned 5 scores for 6 responses"),
    ("return [float('nan')] * len(responses)", "NaN"),
])
def test_a_bad_judge_is_an_error_and_writes_nothing(in_process, lora_run, tmp_path, capsys, body, message):
    fn = tmp_path / "judge.py"
    fn.write_text(f"def score(prompts, responses):\n    {body}\n")
    work = tmp_path / "work"
    work.mkdir()
    assert in_process(*generate_args(lora_run, work / "out.jsonl", "--reward-fn", f"{fn}:score")) == 2
    assert message in error_line(capsys.readouterr().err)
    assert list(work.iterdir()) == []


def test_a_plain_model_directory_and_a_reward_model_judge(in_process, lora_run, rm_run, tmp_path):
    """A merged/plain causal LM directory samples as it is; an RM run judges (a separate
    model here: the plain model has no adapters to carry it)."""
    from rlhf_cli.models.loading import load_causal_lm

    recipe = load_recipe(REPO / "recipes" / "tiny-sft.yaml")
    plain = tmp_path / "plain"
    load_causal_lm(recipe.model).save_pretrained(str(plain))
    tokenizer_for(recipe).save_pretrained(str(plain))
    out = tmp_path / "o.jsonl"
    assert in_process(*generate_args(plain, out, "--reward-model", str(rm_run))) == 0
    rows = read_jsonl(out)
    assert len(rows) == 7
    assert all(len(r["scores"]) == 3 and all(isinstance(s, float) for s in r["scores"]) for r in rows)
    assert len({s for r in rows for s in r["scores"]}) > 1


def test_an_rm_on_the_runs_base_rides_on_the_policy(in_process, lora_run, rm_run, tmp_path, monkeypatch):
    """A LoRA run and an RM run on the same base: the RM is a frozen adapter on the policy's
    base (no separate RM model is loaded)."""
    from rlhf_cli.models import reward_judge

    def no_second_model(*args, **kwargs):
        raise AssertionError("a separate reward model was loaded")

    monkeypatch.setattr(reward_judge, "frozen_reward_model", no_second_model)
    out = tmp_path / "o.jsonl"
    assert in_process(*generate_args(lora_run, out, "--reward-model", str(rm_run))) == 0
    assert all(len(r["scores"]) == 3 for r in read_jsonl(out))


# ------------------------------------------------------------------------------ slow


@pytest.fixture(scope="module")
def sft_run(rlhf_home, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("gen_sft")
    proc = rlhf("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "--set", "train.max_steps=4",
                "--set", "train.eval_every=null", "--set", "train.save_every=null", "-o", "run", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "run"


@pytest.mark.slow
def test_sigint_then_resume_with_two_ranks(sft_run, tmp_path):
    """A real SFT run on builtin:tiny, builtin:sort prompts, two gloo ranks: Ctrl-C to the whole
    command, then --resume (two ranks again, sharing only the prompts left): each prompt once."""
    out = tmp_path / "big.jsonl"
    args = ["generate", "--model", str(sft_run), "--data", "builtin:sort:train:40", "--n", "2",
            "--max-new-tokens", "8", "--batch-size", "1", "--reward-fn", SORT, "--out", str(out),
            "--num-processes", "2"]
    proc = subprocess.Popen(cli_argv(*args), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    parts = tmp_path / "big.jsonl.parts"

    def rows_by_rank() -> list[int]:
        return [len(read_jsonl(parts / f"rank{r}.jsonl")) if (parts / f"rank{r}.jsonl").exists() else 0
                for r in (0, 1)]

    deadline = time.time() + 180
    while time.time() < deadline and min(rows_by_rank()) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C goes to the whole group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    assert not out.exists()
    assert min(rows_by_rank()) >= 2 and sum(rows_by_rank()) < 40  # both ranks wrote, not all done
    done = rlhf(*args, "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out, strict=True)  # whole lines only
    assert [r["prompt"] for r in rows] == prompt_texts("builtin:sort:train:40")
    for row in rows:
        assert row["scores"] == pytest.approx(sort_reward([row["prompt"]] * 2, row["responses"]), rel=1e-6)
    assert not parts.exists()

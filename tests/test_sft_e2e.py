"""SFT end to end through the real CLI (a subprocess: real exit codes, real stderr).

One 60-step LoRA run on the embedded default (`builtin:tiny`, `builtin:sort`) is shared by
the layout, metrics, score, adapter and provenance checks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, read_jsonl, rlhf, run_in

RECIPE = REPO / "recipes" / "tiny-sft.yaml"
# Small and quick: short sequences, few eval prompts, no mid-run eval but one checkpoint.
FAST = ["--set", "data.max_length=32", "--set", "train.batch_size=16",
        "--set", "train.eval_num_prompts=32", "--set", "train.warmup_steps=5"]
STEPS = 60


@pytest.fixture(scope="module")
def sft_run(rlhf_home, tmp_path_factory):
    return run_in(tmp_path_factory.mktemp("sft_e2e"), "sft", "--recipe", str(RECIPE), *FAST,
                  "--set", f"train.max_steps={STEPS}", "--set", "train.log_every=10",
                  "--set", "train.eval_every=null", "--set", "train.save_every=30")


@pytest.mark.slow
def test_sft_exits_zero_with_the_documented_layout(sft_run):
    run, proc = sft_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "training_curves.png"):
        assert (run / name).is_file(), name
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The one intermediate checkpoint is complete and resumable; nothing half-written remains.
    step = run / "checkpoints" / "step-30"
    assert (step / "trainer_state.json").is_file()
    assert json.loads((step / "trainer_state.json").read_text())["step"] == 30
    assert not list(run.rglob(".tmp*")) and not (run / "final.tmp").exists()
    final = run / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert (final / name).is_file(), name


@pytest.mark.slow
def test_recipe_yaml_is_the_resolved_recipe(sft_run):
    from rlhf_cli.config import load_resolved

    run, _ = sft_run
    recipe = load_resolved(run / "recipe.yaml")
    assert recipe.stage == "sft" and recipe.train.max_steps == STEPS
    assert recipe.data.max_length == 32 and recipe.train.eval_every is None


@pytest.mark.slow
def test_metrics_rows(sft_run):
    run, _ = sft_run
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if r.get("split") != "eval"]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in train] == list(range(10, STEPS + 1, 10))
    for row in train:
        assert isinstance(row["step"], int)
        assert isinstance(row["loss"], float) and math.isfinite(row["loss"])
        assert row["lr"] > 0 and math.isfinite(row["grad_norm"])
    assert train[-1]["loss"] < train[0]["loss"] / 4
    # Evaluated before training and at the end: held-out loss and the task's score.
    assert [r["step"] for r in evals] == [0, STEPS]
    for row in evals:
        assert {"loss", "score", "solved"} <= set(row)


@pytest.mark.slow
def test_task_score_rises(sft_run):
    run, _ = sft_run
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("split") == "eval"]
    # Measured: 0.0 before training, ~0.94 after 60 steps.
    assert evals[0]["score"] < 0.1
    assert evals[-1]["score"] > 0.5
    assert evals[-1]["loss"] < evals[0]["loss"] / 4


@pytest.mark.slow
def test_run_json_provenance(sft_run):
    run, _ = sft_run
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1
    for name in ("torch", "transformers", "peft", "accelerate"):
        assert info["versions"][name], name
    assert info["start_time"] and info["end_time"]
    assert "rlhf sft" in info["command"] and f"train.max_steps={STEPS}" in info["command"]


@pytest.mark.slow
def test_adapter_loads_offline_against_its_base(sft_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = sft_run
    final = run / "final"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    # The built-in base was written to disk, so its name resolves with no network
    # (conftest sets HF_HUB_OFFLINE=1 before transformers is imported).
    assert Path(base).is_dir() and os.environ["HF_HUB_OFFLINE"] == "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(final)
        ids = tokenizer("sort dbca =", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base_logits = AutoModelForCausalLM.from_pretrained(base)(ids).logits
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
            tuned_logits = model(ids).logits
    finally:
        torch.set_num_threads(threads)
    assert tuned_logits.shape == base_logits.shape
    assert (tuned_logits - base_logits).abs().max() > 1e-2


@pytest.mark.slow
def test_dry_run_prints_and_trains_nothing(rlhf_home, tmp_path):
    proc = rlhf("sft", "--recipe", str(RECIPE), *FAST, "--set", "train.max_steps=7",
                "--set", "launch.num_processes=2", "--dry-run", "-o", "dry", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # The resolved recipe, overrides applied ...
    assert "max_steps: 7" in out and "max_length: 32" in out and "num_processes: 2" in out
    # ... the exact launch command (two processes go through torchrun) ...
    assert "torch.distributed.run" in out and "--nproc_per_node=2" in out
    assert "rlhf_cli.worker" in out and str(Path("dry") / "recipe.yaml") in out
    # ... and the first training example as the model sees it.
    assert "<s>sort " in out and "</s>" in out
    assert not (tmp_path / "dry").exists()


@pytest.mark.slow
def test_preview_json_aligns_ids_and_labels(rlhf_home, tmp_path):
    from rlhf_cli.builtin.tasks import sort_answer
    from rlhf_cli.builtin.tokenizer import BOS_ID, EOS_ID

    proc = rlhf("preview", "--recipe", str(RECIPE), "--set", "data.max_length=32",
                "--n", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(items) == 2
    for item in items:
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels) <= 32
        assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))
        assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
        assert ids[-1] == EOS_ID and labels[-1] == EOS_ID
        # Loss on the response only: a run of -100 (the prompt), then every token trained.
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert first > 1 and all(label != -100 for label in labels[first:])
        letters = item["text"].split("sort ", 1)[1].split(" =", 1)[0]
        assert item["loss_text"] == sort_answer(letters) + "</s>"


def test_preview_shows_loss_on_prompt_when_not_completion_only(rlhf_home, capsys):
    """`sft.completion_only: false` trains on every token, and the preview must say so."""
    from rlhf_cli.config import load_recipe
    from rlhf_cli.dry_run import show_preview

    recipe = load_recipe(RECIPE, ["data.max_length=32", "sft.completion_only=false"])
    show_preview(recipe, n=2, as_json=True)
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(items) == 2
    assert all(item["labels"] == item["input_ids"] for item in items)


def test_help_does_not_import_torch(tmp_path):
    code = ("import sys\n"
            "from rlhf_cli.cli import main\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            "codes = [main(['--help']), main(['sft', '--help']), main(['merge-lora', '--help'])]\n"
            "assert codes == [0, 0, 0], codes\n"
            "assert 'torch' not in sys.modules, 'help'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rlhf sft --recipe" in proc.stdout


@pytest.mark.slow
def test_full_finetune_writes_a_plain_model(rlhf_home, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.builtin.model import materialize

    proc = rlhf("sft", "--recipe", str(RECIPE), *FAST, "--set", "model.lora=null",
                "--set", "train.max_steps=3", "--set", "train.eval_reward_fn=null",
                "--set", "train.eval_every=null", "--set", "data.eval=null",
                "--set", "train.save_every=null", "-o", "full", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    final = tmp_path / "full" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = AutoTokenizer.from_pretrained(final)("sort dbca =", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            tuned = AutoModelForCausalLM.from_pretrained(final)(ids).logits
            base = AutoModelForCausalLM.from_pretrained(materialize("tiny"))(ids).logits
    finally:
        torch.set_num_threads(threads)
    assert (tuned - base).abs().max() > 1e-3

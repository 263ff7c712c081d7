"""Reward model and DPO end to end through the real CLI (subprocesses: real exit codes).

Short runs of the tiny recipes on the built-in sort task's preference pairs. The RM run is
merged and loaded with plain transformers, whose scores must give the same held-out
accuracy as `rlhf eval`; the DPO runs check the first loss (log 2: the policy starts equal
to its adapter-disabled reference) and that precomputed reference log-probs change nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import REPO, eval_rows, rlhf, run_in, train_rows

RM_RECIPE = REPO / "recipes" / "tiny-rm.yaml"
DPO_RECIPE = REPO / "recipes" / "tiny-dpo.yaml"
EVAL_PAIRS = 100
EVAL_DATA = f"builtin:sort:eval:{EVAL_PAIRS}"
RM_STEPS = 80
DPO_STEPS = 30
# DPO on a small train set: precomputing reference log-probs then takes a second.
DPO_FAST = ["--set", "data.train=builtin:sort:train:512", "--set", f"data.eval={EVAL_DATA}",
            "--set", "data.max_length=32", "--set", "train.log_every=1",
            "--set", "train.eval_reward_fn=null", "--set", "train.save_every=null"]


# ------------------------------------------------------------------ reward model


def test_scores_are_read_at_the_last_real_token_and_an_empty_row_has_none(monkeypatch):
    """By hand: head weights [1, 10] read state (a, b) as a + 10·b; each row's state at
    position t is (t, row)."""
    import torch

    from rlhf_cli.models import heads
    from rlhf_cli.models.reward import last_token_scores

    head = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 10.0]]))
    hidden = torch.stack([torch.stack([torch.tensor([float(t), float(row)]) for t in range(4)])
                          for row in range(3)])
    mask = torch.tensor([[1, 1, 0, 0],   # right padding: last real token t=1 -> 1 + 0 = 1
                         [0, 1, 1, 1],   # left padding: t=3 -> 3 + 10 = 13
                         [0, 0, 0, 0]])  # all padding: no token, no score
    scores = last_token_scores(head, hidden, mask)
    assert scores[:2].tolist() == [1.0, 13.0] and math.isnan(scores[2])
    # The PPO arrangements' reward head reads the same way (the body's states given here).
    monkeypatch.setattr(heads, "hidden_states", lambda model, ids, attention_mask: hidden)
    ppo_scores = heads.sequence_reward(None, head, None, mask)
    assert ppo_scores[:2].tolist() == [1.0, 13.0] and math.isnan(ppo_scores[2])


def test_reward_is_read_at_the_eos_whatever_the_padding():
    """Pad id = EOS id on purpose: the score must still come from the real EOS."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_cli.models.reward import score_sequences

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=2, eos_token_id=2, bos_token_id=1)
    model = LlamaForSequenceClassification(config).eval()
    rows = [[1, 7, 8, 9, 2], [1, 5, 2]]
    with torch.no_grad():
        alone = [float(score_sequences(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)))
                 for r in rows]
        for side in ("right", "left"):
            ids = torch.full((2, 5), 2)
            mask = torch.zeros(2, 5, dtype=torch.long)
            for i, r in enumerate(rows):
                span = slice(0, len(r)) if side == "right" else slice(5 - len(r), 5)
                ids[i, span], mask[i, span] = torch.tensor(r), 1
            batched = score_sequences(model, ids, mask).tolist()
            assert batched == pytest.approx(alone, abs=1e-5), side
        # The head on the last hidden state of the EOS, computed by hand.
        hidden = model.model(input_ids=torch.tensor([rows[1]])).last_hidden_state[0, -1]
        assert alone[1] == pytest.approx(float(model.score(hidden)), abs=1e-6)


@pytest.fixture(scope="module")
def rm_run(rlhf_home, tmp_path_factory):
    return run_in(tmp_path_factory.mktemp("rm_e2e"), "rm", "--recipe", str(RM_RECIPE),
                  "--set", f"train.max_steps={RM_STEPS}", "--set", f"train.eval_every={RM_STEPS}",
                  "--set", "train.save_every=null", "--set", f"data.eval={EVAL_DATA}",
                  "--set", "data.max_length=32")


@pytest.mark.slow
def test_rm_run_saves_adapter_head_and_reward_stats(rm_run):
    run, proc = rm_run
    assert "Traceback" not in proc.stderr
    final = run / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    from safetensors import safe_open

    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("score.weight") for k in keys), "the scalar head was not saved"
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["source"] == "eval" and stats["std"] > 0 and math.isfinite(stats["mean"])
    last = eval_rows(run)[-1]
    assert last["step"] == RM_STEPS
    assert stats["accuracy"] == pytest.approx(last["accuracy"])
    # Chance is 0.5; a short run is already far above it (~0.8-0.9; the full recipe ~0.97).
    assert last["accuracy"] >= 0.7, last
    said = " ".join(proc.stderr.split())
    assert f"accuracy {last['accuracy']:.3f} on {EVAL_PAIRS} held-out pairs" in said


def plain_transformers_accuracy(model_dir: Path, rows: list[dict]) -> float:
    """Held-out accuracy computed with nothing but transformers on the merged model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.num_labels == 1

    def scores(side: str) -> torch.Tensor:
        # The plain template joins prompt and response as they are; EOS ends the response.
        texts = [row["prompt"] + row[side] + tokenizer.eos_token for row in rows]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**batch).logits[:, 0]

    return float((scores("chosen") > scores("rejected")).float().mean())


@pytest.mark.slow
def test_merged_rm_loads_in_transformers_and_eval_agrees(rm_run, tmp_path):
    from rlhf_cli.builtin.tasks import builtin_rows

    run, _ = rm_run
    merged = tmp_path / "merged"
    proc = rlhf("merge-lora", str(run), "--out", str(merged), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    # PPO normalises the RM's scores with these, merged or not.
    assert (merged / "reward_stats.json").read_text() == (run / "final" / "reward_stats.json").read_text()
    expected = plain_transformers_accuracy(merged, builtin_rows(EVAL_DATA, "preference"))

    for name, model in (("adapter", run), ("merged", merged)):
        out = tmp_path / f"{name}.json"
        proc = rlhf("eval", "--model", str(model), "--data", EVAL_DATA, "--out", str(out),
                    cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(out.read_text())
        assert report["kind"] == "reward_model" and report["num_pairs"] == EVAL_PAIRS
        # Same pairs, same scores up to float noise: equal, or one near-tie apart at most.
        assert abs(report["accuracy"] - expected) <= 1 / EVAL_PAIRS, (name, report, expected)
        assert (out.with_suffix(".md")).is_file() and (out.with_suffix(".png")).is_file()
    # The reloaded adapter scores like the training run's own last evaluation: its head
    # came back (a fresh head would be near chance).
    assert abs(report["accuracy"] - eval_rows(run)[-1]["accuracy"]) <= 1 / EVAL_PAIRS


# ------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo_run(rlhf_home, tmp_path_factory):
    return run_in(tmp_path_factory.mktemp("dpo_e2e"), "dpo", "--recipe", str(DPO_RECIPE), *DPO_FAST,
                  "--set", f"train.max_steps={DPO_STEPS}", "--set", f"train.eval_every={DPO_STEPS}")


@pytest.mark.slow
def test_dpo_starts_at_log2_and_learns_the_preference(dpo_run):
    run, proc = dpo_run
    assert "Traceback" not in proc.stderr
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, DPO_STEPS + 1))
    # Step 1: the LoRA B matrices are zero, so π = π_ref exactly and Δ = 0.
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # Later the reference (adapter disabled) stays put while the policy moves; a reference
    # that followed the policy would keep the loss at log 2.
    assert rows[-1]["loss"] < 0.6
    assert rows[-1]["rewards/margins"] > 0
    before, after = eval_rows(run)[0], eval_rows(run)[-1]
    assert before["step"] == 0 and after["step"] == DPO_STEPS
    assert before["rewards/accuracies"] == 0.0  # every Δ is 0: ties count as wrong
    # 0.74 after 30 steps on pairs with ten kinds of mistakes (tasks.MISTAKES; 0.5 is chance);
    # the full recipe on an SFT model reaches 1.0 (`make demo`).
    assert after["rewards/accuracies"] >= 0.7, after
    final = run / "final"
    assert (final / "adapter_config.json").is_file()
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


@pytest.mark.slow
def test_precomputed_reference_gives_the_same_losses(dpo_run, tmp_path):
    run, _ = dpo_run
    proc = rlhf("dpo", "--recipe", str(DPO_RECIPE), *DPO_FAST, "--set", "train.max_steps=3",
                "--set", "train.eval_every=null", "--set", "dpo.precompute_ref=true",
                "-o", "pre", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "reference log-probs precomputed" in proc.stderr
    live, pre = train_rows(run)[:3], train_rows(tmp_path / "pre")
    assert len(pre) == 3
    # Warm-up makes the first three learning rates equal in both runs, whatever max_steps is.
    for a, b in zip(live, pre, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-4)
    assert pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


# ------------------------------------------------------------- preview, bad data


def test_preview_json_of_a_dpo_recipe_follows_the_contract(rlhf_home, tmp_path):
    from rlhf_cli.builtin.tasks import builtin_rows

    proc = rlhf("preview", "--recipe", str(DPO_RECIPE), "--n", "3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(items) == 3
    for item, row in zip(items, builtin_rows("builtin:sort", "preference")[:3], strict=True):
        assert (item["prompt"], item["chosen"], item["rejected"]) == (
            row["prompt"], row["chosen"], row["rejected"])
        for side in ("chosen", "rejected"):
            ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
            assert len(ids) == len(labels)
            assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2  # one BOS, EOS last
            trained = [i for i, label in zip(ids, labels, strict=True) if label != -100]
            assert all(label in (-100, i) for i, label in zip(ids, labels, strict=True))
            # Loss on the response and its EOS, nothing else.
            assert bytes(t - 4 for t in trained[:-1]).decode() == row[side]
            assert trained[-1] == 2
        # Both sides share the prompt tokens exactly.
        n_prompt = item["chosen_labels"].index(next(x for x in item["chosen_labels"] if x != -100))
        assert item["chosen_input_ids"][:n_prompt] == item["rejected_input_ids"][:n_prompt]


def test_preview_of_rm_and_ppo_recipes(rlhf_home, tmp_path):
    proc = rlhf("preview", "--recipe", str(RM_RECIPE), "--n", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pair 1" in proc.stdout and "rejected" in proc.stdout
    ppo = tmp_path / "ppo.yaml"
    ppo.write_text("stage: ppo\nmodel:\n  base: builtin:tiny\ndata:\n  train: builtin:sort\n"
                   "ppo:\n  reward_fn: rlhf_cli.builtin.tasks:sort_reward\n")
    proc = rlhf("preview", "--recipe", str(ppo), "--n", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [set(i) for i in items] == [{"prompt", "prompt_input_ids"}] * 2
    assert items[0]["prompt"].startswith("sort ") and items[0]["prompt_input_ids"][0] == 1


BAD_RECIPE = """\
stage: dpo
model:
  base: builtin:tiny
  lora:
    r: 4
data:
  train: pairs.jsonl
  max_length: 32
train:
  batch_size: 1
  max_steps: 1
  eval_reward_fn: null
"""
GOOD_PAIRS = [{"prompt": "sort cba =", "chosen": " abc", "rejected": " acb"},
              {"prompt": "sort fed =", "chosen": " def", "rejected": " fed"}]
UNUSABLE = [{"prompt": "sort hg =", "chosen": " gh"},  # no rejected
            {"prompt": "sort ji =", "chosen": " ij", "rejected": " ij"}]  # identical


def write_pairs(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_unusable_pairs_are_counted(rlhf_home, tmp_path):
    (tmp_path / "r.yaml").write_text(BAD_RECIPE)
    write_pairs(tmp_path / "pairs.jsonl", GOOD_PAIRS + UNUSABLE)
    proc = rlhf("dpo", "-r", "r.yaml", "-o", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = " ".join(proc.stderr.split())  # progress goes to stderr; rich may wrap lines
    assert "dropped 2 of 4 rows" in line
    assert "1 chosen or rejected missing" in line and "1 chosen and rejected identical" in line


def test_all_pairs_unusable_is_one_error_line(rlhf_home, tmp_path):
    (tmp_path / "r.yaml").write_text(BAD_RECIPE)
    write_pairs(tmp_path / "pairs.jsonl", UNUSABLE)
    proc = rlhf("dpo", "-r", "r.yaml", "-o", "run", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "every row of" in lines[0] and "pairs.jsonl" in lines[0] and "dropped 2 of 2" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left behind

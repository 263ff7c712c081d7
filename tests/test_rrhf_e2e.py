"""RRHF end to end on the built-in sort task: from a 40-step SFT model (merged), K responses per
prompt sampled from that model and scored by the task's reward function, then `rlhf rrhf` on them
raises the model's greedy held-out score.

The samples are made here with the shared sampler (engine/rollout.py `sample`, the path PPO and
`rlhf generate` use) and the built-in reward function through `function_judge`, written as
`rlhf generate` writes them: {"prompt", "responses": [K], "scores": [K]}.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import REPO, read_jsonl, rlhf

# 4 samples at temperature 0.7 for each of 384 prompts; 96 steps of 16 prompts (4 epochs) at the
# recipe's lr 3e-4. Measured (greedy score on 128 held-out prompts, from 0.806; solved from 0.523):
# 0.863 (solved 0.633) with train.seed 42, 0.874 (0.625) with seed 1; after 48 steps only +0.011
# with seed 1. At temperature 1 the 40-step model's samples are poor (mean 0.41; the best of 8
# scores 0.78 on average, below its greedy answers). 8 samples at 0.7 lowered the score (0.786 after
# 48 steps); lr 1e-3 gave 0.812 after 48 steps, and 0.775 on the temperature-1 samples.
PROMPTS, K, TEMPERATURE = 384, 4, 0.7
STEPS = 96


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rrhf_e2e")


@pytest.fixture(scope="module")
def sft_base(work) -> Path:
    """A 40-step SFT model, merged: it sorts some prompts right (room to improve)."""
    proc = rlhf("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "-o", "sft",
                "--set", "train.max_steps=40", "--set", "train.warmup_steps=5",
                "--set", "train.eval_every=null", "--set", "train.save_every=null", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = rlhf("merge-lora", "sft", "--out", "sft-merged", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "sft-merged"


def sample_and_score(model_dir: Path, out: Path, seed: int = 0) -> dict:
    """K samples (at TEMPERATURE) for each of the first PROMPTS training prompts, scored; the rows'
    mean score and the share of prompts whose K scores are not all equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.builtin.tasks import builtin_rows
    from rlhf_cli.data.prompt_data import build_prompt_dataset
    from rlhf_cli.engine.judge import function_judge
    from rlhf_cli.engine.rollout import PlainPolicy, decode_responses, sample

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    policy = PlainPolicy(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))
    prompts, _ = build_prompt_dataset(builtin_rows("builtin:sort", "prompts")[:PROMPTS], tokenizer,
                                      "plain", None, source="builtin:sort")
    judge = function_judge("rlhf_cli.builtin.tasks:sort_reward", "test")
    settings = SimpleNamespace(temperature=TEMPERATURE, top_p=1.0, top_k=0, max_new_tokens=12)
    rows = []
    for start in range(0, len(prompts), 32):
        chunk = [e for e in prompts[start:start + 32] for _ in range(K)]
        rollout = sample(policy, chunk, tokenizer, settings, "cpu")
        responses = decode_responses(rollout, tokenizer)
        scores = judge(rollout, responses).tolist()
        for i in range(0, len(chunk), K):
            rows.append({"prompt": chunk[i]["prompt"], "responses": responses[i:i + K],
                         "scores": scores[i:i + K]})
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mean = sum(sum(r["scores"]) for r in rows) / (len(rows) * K)
    ranked = sum(len(set(r["scores"])) > 1 for r in rows) / len(rows)
    return {"mean_score": mean, "ranked_share": ranked}


@pytest.mark.slow
def test_rrhf_on_scored_samples_raises_the_greedy_score(work, sft_base):
    samples = work / "samples.jsonl"
    stats = sample_and_score(sft_base, samples)
    assert stats["ranked_share"] > 0.5, stats  # most prompts have something to rank
    proc = rlhf("rrhf", "--recipe", str(REPO / "recipes" / "tiny-rrhf.yaml"), "-o", "rrhf",
                "--set", f"model.base={sft_base}", "--set", f"data.train={samples}",
                "--set", f"train.max_steps={STEPS}", "--set", "train.eval_every=null",
                "--set", "train.save_every=null", cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(work / "rrhf" / "metrics.jsonl")
    evals = {r["step"]: r for r in rows if r.get("split") == "eval"}
    before, after = evals[0], evals[STEPS]
    print(f"samples {stats}; greedy held-out score {before['score']:.3f} -> {after['score']:.3f}, "
          f"solved {before['solved']:.3f} -> {after['solved']:.3f}")
    assert after["score"] > before["score"] + 0.03, (before, after, stats)
    train = [r for r in rows if r.get("split") != "eval"]
    assert all(0 <= r["rank_accuracy"] <= 1 and r["rank_loss"] >= 0 for r in train), train
    assert (work / "rrhf" / "final" / "adapter_model.safetensors").is_file()

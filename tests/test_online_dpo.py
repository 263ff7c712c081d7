"""Online DPO (`rlhf dpo` with `dpo.online: true`): the best/worst pairing by hand, one step's
loss against an independent computation from `model(...).logits`, the recipe checks, and (slow)
resume = uninterrupted and a rising held-out score from a briefly trained SFT model."""

from __future__ import annotations

import copy
import json
import math
import shlex

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import REPO, error_line, read_jsonl, rlhf, train_rows
from fault_helpers import assert_same_run, assert_stopped_cleanly, ctrl_c_after_two_rows, start, stopped_at

from rlhf_cli.data.sft import IGNORE_INDEX
from rlhf_cli.stages.dpo.online import collate_online_pairs, online_step_loss, summarise
from rlhf_cli.stages.dpo.pairing import best_and_worst, pair_example

RECIPE = str(REPO / "recipes" / "tiny-online-dpo.yaml")
# A judge with spread on the random base: the sum of the response's character codes mod 7.
JUDGE = "def score(prompts, responses):\n    return [float(sum(map(ord, r)) % 7) for r in responses]\n"
SMALL = ["train.batch_size=4", "dpo.samples_per_prompt=3", "dpo.max_new_tokens=6",
         "train.eval_reward_fn=null", "data.eval=null", "train.eval_every=null", "train.save_every=null",
         "train.log_every=1"]


# ------------------------------------------------------------------ pairing by hand


def test_best_and_worst_pairs_by_hand_with_ties():
    scores = [3.0, 1.0, 2.0,   # distinct: best 0, worst 1
              5.0, 5.0, 5.0,   # all tie: no pair
              0.0, 2.0, 2.0,   # a tie for best: the first of them (7), worst 6
              1.0, 0.0, 0.0,   # a tie for worst: the first of them (10)
              -1.0, -1.0, 4.0]  # negative scores, best last
    assert best_and_worst(scores, 3) == [(0, 1), None, (7, 6), (9, 10), (14, 12)]
    assert best_and_worst([0.5, 0.7, 1.0, 1.0], 2) == [(1, 0), None]  # K = 2
    with pytest.raises(ValueError):
        best_and_worst([1.0, 2.0, 3.0], 2)  # not whole groups
    with pytest.raises(ValueError):
        best_and_worst([1.0, 2.0], 1)  # one sample gives no pair


def test_pair_example_masks_the_prompt():
    pair = pair_example([1, 5, 6], [7, 2], [8, 9, 2])
    masked = [IGNORE_INDEX] * 3
    assert pair == {"chosen_input_ids": [1, 5, 6, 7, 2], "chosen_labels": masked + [7, 2],
                    "rejected_input_ids": [1, 5, 6, 8, 9, 2], "rejected_labels": masked + [8, 9, 2]}


def test_the_skipped_share_and_the_judge_means_by_hand():
    counts = {"prompts": 8, "skipped": 2, "pairs": 6, "samples": 32, "score": 16.0, "score_chosen": 4.5,
              "score_rejected": 1.5, "response_tokens": 96.0}
    assert summarise(counts) == {"score": 0.5, "skipped_share": 0.25, "pairs": 6, "response_length": 3.0,
                                 "score/chosen": 0.75, "score/rejected": 0.25}
    tied = summarise({**counts, "skipped": 8, "pairs": 0})
    assert tied["skipped_share"] == 1.0 and "score/chosen" not in tied  # no pair: no pair means


class FixedObjective(torch.nn.Module):
    """Log-probs −w·(last id) with a trainable w; the reference's are −1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, input_ids, attention_mask, labels, reference: bool = False):
        rows = input_ids[:, -1].float()
        logps = torch.full_like(rows, -1.0) if reference else -self.w * rows
        return logps, torch.ones_like(rows)


def test_a_stand_in_pair_gives_no_gradient_and_no_metrics():
    from rlhf_cli.algorithms.preference import SigmoidLoss

    model, loss = FixedObjective(), SigmoidLoss(beta=0.1)
    real = collate_online_pairs([pair_example([1], [3], [4])], pad_token_id=0)
    stand_in = collate_online_pairs([{**pair_example([1], [3], [3]), "stand_in": True}], pad_token_id=0)
    assert real["pair_weight"].tolist() == [1.0] and stand_in["pair_weight"].tolist() == [0.0]
    total, metrics = online_step_loss(model, real, loss=loss)
    # By hand: Δ = (−1.5 + 1) − (−2 + 1) = 0.5, loss = −log σ(0.05).
    assert total.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.05))), rel=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.05)
    total, metrics = online_step_loss(model, stand_in, loss=loss)
    total.backward()
    assert float(model.w.grad) == 0.0 and set(metrics.values()) == {0.0}


# ------------------------------------------------------------------ one step, in process


def _response_logps(lm, pairs: list[dict], side: str) -> torch.Tensor:
    """Σ log p of each pair's response tokens, from the full `lm(...).logits`, one row at a time."""
    out = []
    for pair in pairs:
        ids = torch.tensor([pair[f"{side}_input_ids"]])
        labels = torch.tensor(pair[f"{side}_labels"])
        logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
        targets, mask = labels[1:], labels[1:] != IGNORE_INDEX
        out.append(F.log_softmax(logits, dim=-1)[mask].gather(1, targets[mask][:, None]).sum())
    return torch.stack(out)


def online_dpo(*overrides: str):
    from rlhf_cli.config import load_recipe
    from rlhf_cli.engine.backends import make_backend
    from rlhf_cli.models.policy import tokenizer_for
    from rlhf_cli.stages.dpo.online import OnlineDPO

    recipe = load_recipe(RECIPE, [*SMALL, *overrides])
    return OnlineDPO(recipe, tokenizer_for(recipe), make_backend(recipe))


@pytest.fixture
def online(rlhf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge.py").write_text(JUDGE)
    return online_dpo(f"dpo.reward_fn={tmp_path / 'judge.py'}:score")


@torch.no_grad()
def test_one_step_learns_from_the_judges_best_and_worst(online):
    lm = online.backend.unwrap(online.model).lm
    torch.manual_seed(0)
    for name, param in lm.named_parameters():
        if "lora_B" in name:  # policy != reference, so the loss is more than log 2
            param.normal_(0, 0.05)
    before = copy.deepcopy(lm).eval()
    seen = []
    real_sample_pairs = online.sample_pairs
    online.sample_pairs = lambda *args: seen.append(real_sample_pairs(*args)) or seen[-1]
    with torch.enable_grad():
        row = online.step(0)
    pairs = [p for micro, _ in seen for p in micro if not p.get("stand_in")]
    stats = seen[0][1]
    assert row["pairs"] == len(pairs) == stats["pairs"] > 0
    assert row["skipped_share"] == stats["skipped"] / 4
    assert row["score/chosen"] > row["score/rejected"]  # the best above the worst of each
    # Independently: the sigmoid DPO loss from the pre-step policy (adapter on) and reference (off).
    policy = [_response_logps(before, pairs, side) for side in ("chosen", "rejected")]
    with before.disable_adapter():
        reference = [_response_logps(before, pairs, side) for side in ("chosen", "rejected")]
    delta = (policy[0] - reference[0]) - (policy[1] - reference[1])
    assert row["loss"] == pytest.approx(float(-F.logsigmoid(0.1 * delta).mean()), rel=1e-4)
    assert row["rewards/margins"] == pytest.approx(float(0.1 * delta.mean()), rel=1e-4, abs=1e-6)
    assert abs(row["loss"] - math.log(2)) > 1e-4
    after = online.backend.unwrap(online.model).lm
    assert any(not torch.equal(a, b) for (n, a), (_, b) in zip(after.named_parameters(),
                                                              before.named_parameters(), strict=True)
               if "lora_" in n)  # the step moved the adapter


def test_a_step_where_every_prompt_ties_updates_nothing(online, monkeypatch):
    online.judge = lambda rollout, responses: torch.ones(len(responses))
    lm = online.backend.unwrap(online.model).lm
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    row = online.step(0)
    assert row["skipped_share"] == 1.0 and row["pairs"] == 0 and "loss" not in row
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters() if p.requires_grad)
    assert online.scheduler.last_epoch == 1  # the schedule moved on


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_other_paired_losses_step_too(loss_type, rlhf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge.py").write_text(JUDGE)
    online = online_dpo(f"dpo.reward_fn={tmp_path / 'judge.py'}:score", f"dpo.loss_type={loss_type}")
    row = online.step(0)
    assert row["pairs"] > 0 and math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])


def test_full_fine_tuning_steps_against_a_frozen_copy(rlhf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge.py").write_text(JUDGE)
    online = online_dpo(f"dpo.reward_fn={tmp_path / 'judge.py'}:score", "model.lora=null")
    objective = online.backend.unwrap(online.model)
    assert objective.frozen_reference is not None
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    row = online.step(0)
    assert row["pairs"] > 0 and row["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = its copy
    moved = {n for n, p in objective.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("lm.") for n in moved)  # the reference copy stays


def test_a_reward_model_judges_as_a_frozen_adapter_on_the_policy(rm_run, tmp_path, monkeypatch):
    """An RM trained on the policy's base rides on it as the frozen `reward` adapter: one step
    pairs by its scores (those of an independently loaded RM), trains the policy's adapter only."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from rlhf_cli.models.adapters import REWARD

    monkeypatch.chdir(tmp_path)
    online = online_dpo("dpo.reward_fn=null", f"dpo.reward_model={rm_run}")
    lm = online.backend.unwrap(online.model).lm
    assert REWARD in lm.peft_config and lm.active_adapter == "default"
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if f".{REWARD}." in n}
    judged, real_judge = [], online.judge

    def recording_judge(rollout, responses):
        judged.append((rollout, real_judge(rollout, responses)))
        return judged[-1][1]

    online.judge = recording_judge
    row = online.step(0)
    assert row["pairs"] > 0 and row["score/chosen"] > row["score/rejected"]
    assert all(torch.equal(p, frozen[n]) for n, p in lm.named_parameters() if n in frozen)
    base = json.loads((rm_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    rm = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),
                                   str(rm_run / "final")).eval()
    rollout, scores = judged[0]
    with torch.no_grad():  # prompt | response rows: the score at each row's last real token
        logits = rm(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, 0]
    assert scores.tolist() == pytest.approx(logits.tolist(), abs=1e-4)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("overrides, key, text", [
    (["dpo.reward_fn=null"], "dpo.online", "online DPO needs a judge"),
    (["dpo.samples_per_prompt=1"], "dpo.samples_per_prompt", "must be >= 2"),
    (["dpo.loss_type=kto"], "dpo.loss_type", "kto learns from unpaired completions"),
    (["dpo.precompute_ref=true"], "dpo.precompute_ref", "cannot be computed before training"),
])
def test_bad_online_recipes_are_user_errors(overrides, key, text, rlhf_home, tmp_path):
    args = [a for o in overrides for a in ("--set", o)]
    proc = rlhf("dpo", "--recipe", RECIPE, *args, "-o", "run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert key in line and text in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_preview_shows_the_prompts_online_dpo_samples_from(rlhf_home, tmp_path):
    proc = rlhf("preview", "--recipe", RECIPE, "--n", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all("sort" in r["prompt"] and r["prompt_input_ids"] for r in rows)


# ------------------------------------------------------------------ slow: resume, learning


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(rlhf_home, tmp_path):
    (tmp_path / "judge.py").write_text(JUDGE)
    args = ["dpo", "--recipe", RECIPE, *(a for o in SMALL for a in ("--set", o)),
            "--set", f"dpo.reward_fn={tmp_path / 'judge.py'}:score", "--set", "train.max_steps=12",
            "--set", "train.grad_accum=2", "--set", "train.lr=1e-3"]
    run = tmp_path / "run"
    stderr = ctrl_c_after_two_rows(start([*args, "-o", "run"], tmp_path), run)
    step, checkpoint, command = stopped_at(stderr, "step", 12)
    assert_stopped_cleanly(run, tmp_path / checkpoint, step)
    resumed = rlhf(*shlex.split(command)[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {step})" in resumed.stderr
    straight = rlhf(*args, "-o", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert_same_run(run, tmp_path / "straight")
    rows = train_rows(tmp_path / "straight")
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert len({r["score/chosen"] for r in rows if "score/chosen" in r}) > 1  # new samples each step


SFT_STEPS = 40
ONLINE_STEPS = 40


@pytest.fixture(scope="module")
def sft_base(rlhf_home, tmp_path_factory):
    """A 40-step SFT model, merged: it sorts some letters right (room to improve)."""
    work = tmp_path_factory.mktemp("online_dpo")
    proc = rlhf("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "-o", "sft",
                "--set", f"train.max_steps={SFT_STEPS}", "--set", "train.warmup_steps=5",
                "--set", "train.eval_every=null", "--set", "train.save_every=null", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = rlhf("merge-lora", "sft", "--out", "sft-merged", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "sft-merged"


@pytest.mark.slow
def test_online_dpo_raises_the_held_out_score(sft_base, tmp_path):
    proc = rlhf("dpo", "--recipe", RECIPE, "-o", "run", "--set", f"model.base={sft_base}",
                "--set", f"train.max_steps={ONLINE_STEPS}", "--set", "train.eval_every=null",
                "--set", "train.save_every=null", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evals = {r["step"]: r["score"] for r in rows if r.get("split") == "eval"}
    assert evals[ONLINE_STEPS] > evals[0] + 0.05, evals
    train = [r for r in rows if r.get("split") != "eval"]
    assert [r["step"] for r in train] == list(range(1, ONLINE_STEPS + 1))
    assert all(0 <= r["skipped_share"] <= 1 for r in train)
    assert all(r["score/chosen"] > r["score/rejected"] for r in train if "score/chosen" in r)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()

"""`rlhf eval` through the real CLI on short DPO and RM runs, plus its report maths.

A policy is scored by its implicit DPO reward β·log π/π_ref (the reference is the base with
the adapter disabled), so `rlhf eval` on a DPO run must repeat the run's own last held-out
accuracy; `--generate` samples from the policy and the reference and judges both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import REPO, eval_rows, rlhf

EVAL_PAIRS = 64
EVAL_DATA = f"builtin:sort:eval:{EVAL_PAIRS}"
STEPS = 20
SHORT = ["--set", "data.train=builtin:sort:train:512", "--set", f"data.eval={EVAL_DATA}",
         "--set", "data.max_length=32", "--set", f"train.max_steps={STEPS}",
         "--set", f"train.eval_every={STEPS}", "--set", "train.log_every=10",
         "--set", "train.save_every=null"]
SORT_REWARD = "rlhf_cli.builtin.tasks:sort_reward"


def last_eval(run: Path) -> dict:
    return eval_rows(run, strict=True)[-1]


@pytest.fixture(scope="module")
def runs(rlhf_home, tmp_path_factory) -> Path:
    """A 20-step DPO run and a 20-step RM run (the judge for --reward-model)."""
    work = tmp_path_factory.mktemp("eval")
    proc = rlhf("dpo", "--recipe", str(REPO / "recipes" / "tiny-dpo.yaml"), *SHORT,
                "--set", "train.eval_reward_fn=null", "-o", "dpo", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = rlhf("rm", "--recipe", str(REPO / "recipes" / "tiny-rm.yaml"), *SHORT, "-o", "rm",
                cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work


@pytest.mark.slow
def test_policy_eval_repeats_the_runs_implicit_accuracy(runs):
    proc = rlhf("eval", "--model", "dpo", "--data", EVAL_DATA, cwd=runs)
    assert proc.returncode == 0, proc.stderr
    out = runs / "dpo" / "eval" / "report.json"  # the default place
    report = json.loads(out.read_text())
    assert report["kind"] == "policy" and report["num_pairs"] == EVAL_PAIRS
    assert report["beta"] == 0.1 and report["skipped"] == 0
    trained = last_eval(runs / "dpo")
    assert abs(report["accuracy"] - trained["rewards/accuracies"]) <= 1 / EVAL_PAIRS
    assert report["mean_margin"] == pytest.approx(trained["rewards/margins"], abs=1e-3)
    assert report["accuracy"] > 0.6
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "implicit reward accuracy" in " ".join(proc.stderr.split() + proc.stdout.split())


@pytest.mark.slow
def test_generate_with_a_reward_function(runs):
    out = runs / "gen" / "fn.json"
    args = ["--generate", "--reward-fn", SORT_REWARD, "--num-prompts", "16",
            "--max-new-tokens", "10"]
    proc = rlhf("eval", "--model", "dpo", "--data", EVAL_DATA, *args, "--out", str(out), cwd=runs)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    gen = report["generation"]
    assert gen["num_prompts"] == 16
    for key in ("mean_reward", "reference_mean_reward", "win_rate"):
        assert 0.0 <= gen[key] <= 1.0, (key, gen)
    assert math.isfinite(gen["kl"]) and gen["kl"] >= 0  # an exact KL (issue 13), never negative
    assert "exact KL" in gen["kl_definition"] and "T=1" in gen["kl_definition"]
    assert len(gen["samples"]) == 5 and gen["samples"][0]["prompt"].startswith("sort ")
    markdown = out.with_suffix(".md").read_text()
    assert "| accuracy |" in markdown and "| generation/win_rate |" in markdown
    assert "| generation/num_prompts | 16 |" in markdown
    assert f"generation/kl: {gen['kl_definition']}." in markdown
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # Sampling is seeded: the same evaluation in-process gives the same numbers.
    from rlhf_cli.stages.evaluate import run_eval

    overrides = {"num_prompts": 16, "max_new_tokens": 10}
    again = run_eval(str(runs / "dpo"), EVAL_DATA, out=runs / "gen" / "again.json",
                     reward_model=None, reward_fn=SORT_REWARD, generate=True, reference=None,
                     overrides=overrides)
    for key in ("mean_reward", "reference_mean_reward", "win_rate"):
        assert again["generation"][key] == gen[key], key
    assert again["generation"]["kl"] == pytest.approx(gen["kl"], abs=1e-4)


@pytest.mark.slow
def test_generate_judged_by_a_reward_model_and_rm_eval(runs):
    out = runs / "gen" / "rm.json"
    proc = rlhf("eval", "--model", "dpo", "--data", EVAL_DATA, "--generate", "--reward-model", "rm",
                "--num-prompts", "8", "--max-new-tokens", "10", "--out", str(out), cwd=runs)
    assert proc.returncode == 0, proc.stderr
    gen = json.loads(out.read_text())["generation"]
    assert gen["num_prompts"] == 8 and 0.0 <= gen["win_rate"] <= 1.0
    assert all(math.isfinite(gen[k]) for k in ("mean_reward", "reference_mean_reward", "kl"))

    proc = rlhf("eval", "--model", "rm", "--data", EVAL_DATA, "--out", "rm.json", cwd=runs)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((runs / "rm.json").read_text())
    assert report["kind"] == "reward_model" and "beta" not in report
    assert abs(report["accuracy"] - last_eval(runs / "rm")["accuracy"]) <= 1 / EVAL_PAIRS


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--model", "dpo", "--generate"], "--generate needs a judge"),
    (["--model", "rm", "--generate", "--reward-fn", SORT_REWARD], "needs a policy"),
    (["--model", "dpo", "--generate", "--reward-model", "dpo"], "is not a reward model"),
    (["--model", "nowhere"], "model not found: nowhere"),
    (["--model", "dpo", "--reward-fn", SORT_REWARD], "add --generate"),
], ids=["no judge", "generate with an rm", "judge is a policy", "missing model",
        "judge without generate"])
def test_eval_user_errors_are_one_line(runs, args, message):
    proc = rlhf("eval", *args, "--data", EVAL_DATA, "--out", "x.json", cwd=runs)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


@pytest.mark.slow
def test_eval_counts_unusable_pairs(runs):
    rows = [{"prompt": "sort cba =", "chosen": " abc", "rejected": " acb"},
            {"prompt": "sort fed =", "chosen": " def"},
            {"prompt": "sort hg =", "chosen": " gh", "rejected": " gh"}]
    (runs / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = rlhf("eval", "--model", "rm", "--data", "pairs.jsonl", "--out", "p.json", cwd=runs)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((runs / "p.json").read_text())
    assert report["num_pairs"] == 1 and report["skipped"] == 2


# ------------------------------------------------------------------ report maths


def test_preference_report_by_hand():
    from rlhf_cli.stages.evaluate import preference_report

    report = preference_report([1.0, 2.0, 0.0, 3.0], [0.0, 2.0, 1.0, 1.0])
    assert report["num_pairs"] == 4
    assert report["accuracy"] == 0.5  # margins 1, 0 (a tie: wrong), -1, 2
    assert report["mean_margin"] == pytest.approx(0.5)
    assert report["chosen_mean"] == pytest.approx(1.5)
    assert report["chosen_std"] == pytest.approx(math.sqrt(5 / 3))  # sample std
    assert report["rejected_mean"] == pytest.approx(1.0)


def test_calibration_bins_by_hand():
    from rlhf_cli.stages.evaluate.report import calibration_bins

    # σ(margin): margins 0 -> 0.5 (bin 5), 10 -> ~1 (bin 9), -10 -> ~0 (bin 0).
    bins = calibration_bins([0.0, 10.0, -10.0, 0.1], [0.0, 0.0, 0.0, 0.0])
    assert [(round(p, 2), acc, n) for p, acc, n in bins] == [(0.0, 0.0, 1), (0.51, 0.5, 2),
                                                             (1.0, 1.0, 1)]

"""RRHF: the loss against numbers worked out by hand, its data (ranked rows and preference pairs,
padding, bad rows), its log-probs against model(...).logits, and `rlhf rrhf` bad input and resume.

The hand-worked batch: three prompts, responses flattened into seven rows.
    row        0    1    2  |  3    4  |  5    6
    group      0    0    0  |  1    1  |  2    2
    logπ(y)   -4   -3   -6  | -3   -1  | -5   -1
    |y|        4    1    2  |  3    2  |  1    1
    score      2    0    0  |  1    0  | .3   .3
α = 1: p = -1 -3 -3 | -1 -.5 | -5 -1.   Ordered pairs (worse, better): (1,0) (2,0) (4,3).
    L_rank = [max(0,-3+1) + max(0,-3+1), max(0,-.5+1), 0] = [0, .5, 0]
α = 0: p = logπ.   L_rank = [max(0,-3+4) + max(0,-6+4), max(0,-1+3), 0] = [1, 2, 0]
Ties add nothing: rows 1 and 2 (α = 0: |p_1 − p_2| = 3) and rows 5 and 6 (4) would.
L_ft: the best of each prompt, the first of a tie: rows 0, 3, 5 -> [4/4, 3/3, 5/1] = [1, 1, 5].
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, error_line, weights
from fault_helpers import VOLATILE, train_rows
from tensor_helpers import close, t

from rlhf_cli.algorithms.rrhf import best_responses, length_normalised, rrhf_loss
from rlhf_cli.builtin.tokenizer import build_tokenizer
from rlhf_cli.data.ranked import build_ranked_dataset, pad_ranked
from rlhf_cli.errors import UserError

LOGPS = t(-4, -3, -6, -3, -1, -5, -1)
LENGTHS = torch.tensor([4, 1, 2, 3, 2, 1, 1])
SCORES = t(2, 0, 0, 1, 0, 0.3, 0.3)
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2, 2])


def test_length_penalty_divides_by_a_power_of_the_length():
    close(length_normalised(LOGPS, LENGTHS, 1.0), [-1, -3, -3, -1, -0.5, -5, -1])
    close(length_normalised(LOGPS, LENGTHS, 0.0), LOGPS.tolist())
    close(length_normalised(t(-8.0), torch.tensor([4]), 0.5), [-4.0])  # -8 / 4^0.5


def test_rrhf_loss_by_hand_alpha_1():
    terms = rrhf_loss(LOGPS, LENGTHS, SCORES, GROUPS, 3, rank_weight=1.0, length_penalty=1.0)
    close(terms.rank, [0.0, 0.5, 0.0])
    close(terms.sft, [1.0, 1.0, 5.0])
    close(terms.loss, [1.0, 1.5, 5.0])
    close(terms.pairs, [2.0, 1.0, 0.0])
    close(terms.misordered, [0.0, 1.0, 0.0])


def test_rrhf_loss_by_hand_alpha_0_and_rank_weight():
    terms = rrhf_loss(LOGPS, LENGTHS, SCORES, GROUPS, 3, rank_weight=0.5, length_penalty=0.0)
    close(terms.rank, [1.0, 2.0, 0.0])  # ties (rows 1-2, 5-6) add nothing
    close(terms.sft, [1.0, 1.0, 5.0])
    close(terms.loss, [0.5 * 1 + 1, 0.5 * 2 + 1, 5.0])
    close(terms.misordered, [1.0, 1.0, 0.0])


def test_gradient_reaches_only_active_pairs_and_the_best_response():
    logps = LOGPS.clone().requires_grad_(True)
    rrhf_loss(logps, LENGTHS, SCORES, GROUPS, 3, rank_weight=0.5, length_penalty=0.0).loss.sum().backward()
    # row 0: L_ft -1/4 and the pair (1,0) -0.5; row 1 +0.5; row 2's pair is inactive; row 3: -1/3
    # and (4,3) -0.5; row 4 +0.5; row 5 L_ft -1; row 6 (tied with the best, after it) nothing.
    close(logps.grad, [-0.75, 0.5, 0.0, -1 / 3 - 0.5, 0.5, -1.0, 0.0])


def test_k2_pair_is_a_hinge_on_the_mean_log_probs_plus_sft_on_chosen():
    # chosen logπ -6 over 3 tokens (p -2), rejected -2 over 2 (p -1): hinge 1, L_ft 2.
    terms = rrhf_loss(t(-6, -2), torch.tensor([3, 2]), t(1, 0), torch.tensor([0, 0]), 1)
    close(terms.loss, [3.0])
    # swapped scores: the hinge is max(0, -2 - -1) = 0, L_ft = 2/2 = 1
    close(rrhf_loss(t(-6, -2), torch.tensor([3, 2]), t(0, 1), torch.tensor([0, 0]), 1).loss, [1.0])


def test_best_response_is_the_first_of_equally_scored_ones():
    assert best_responses(SCORES, GROUPS, 3).tolist() == [0, 3, 5]
    assert best_responses(t(1, 3, 3, -2), torch.tensor([0, 0, 0, 1]), 2).tolist() == [1, 3]


# ------------------------------------------------------------------------------ data

ROWS = [
    {"prompt": "sort cba =", "responses": [" abc", " acb", ""], "scores": [1.0, 0.5, 0]},
    {"prompt": "sort ed =", "chosen": " de", "rejected": " ed"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ranked(rows, tok, **kw):
    return build_ranked_dataset(rows, tok, kw.get("template", "plain"), kw.get("max_length", 64),
                                None, source="data.jsonl")


def test_ranked_rows_and_pairs_share_their_prompt_and_learn_only_the_answers(tok):
    examples, report = ranked(ROWS, tok)
    assert report.kept == 2
    first, pair = examples[0], examples[1]
    assert first["num_responses"] == 3 and first["scores"] == [1.0, 0.5, 0.0]
    assert pair["num_responses"] == 2 and pair["scores"] == [1.0, 0.0]  # chosen above rejected
    assert pair["responses"] == [" de", " ed"]
    prompt = tok("sort cba =")["input_ids"]  # BOS + the prompt's bytes
    for i, answer in enumerate([" abc", " acb", ""]):
        ids, labels = first[f"response{i}_input_ids"], first[f"response{i}_labels"]
        assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [-100] * len(prompt)
        assert tok.decode(ids[len(prompt):]) == answer + tok.eos_token  # an empty answer is EOS alone
        assert labels[len(prompt):] == ids[len(prompt):]


def test_pad_ranked_flattens_every_response_with_its_group_and_score(tok):
    examples, _ = ranked(ROWS, tok)
    batch = pad_ranked([examples[0], examples[1]], tok.pad_token_id)
    assert batch["groups"].tolist() == [0, 0, 0, 1, 1] and batch["num_prompts"] == 2
    assert batch["scores"].tolist() == [1.0, 0.5, 0.0, 1.0, 0.0]
    lengths = [len(examples[0][f"response{i}_input_ids"]) for i in range(3)]
    lengths += [len(examples[1][f"response{i}_input_ids"]) for i in range(2)]
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, length in enumerate(lengths):  # padding carries no loss
        assert (batch["labels"][row, length:] == -100).all()


BAD_ROWS = [
    ({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]},
     "'responses' has 3 items but 'scores' has 2"),
    ({"prompt": "p", "responses": ["a"], "scores": [1]}, "this row has 1 (give 2 or more)"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, float("nan")]},
     "scores[1] is nan, not a finite number"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [float("inf"), 0]}, "scores[0] is inf"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": ["1", 0]}, "scores[0] is '1'"),
    ({"prompt": "p", "responses": ["a", "b"]}, "'responses' without 'scores'"),
    ({"prompt": "p", "responses": "ab", "scores": [1, 0]}, "'responses' must be a list of strings"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_ranked_rows_are_errors_that_name_the_row(tok, row, message):
    with pytest.raises(UserError) as info:
        ranked([ROWS[0], row], tok)
    assert message in str(info.value) and info.value.where == "data.jsonl row 2"


# ------------------------------------------------------------------- log-probs, exact

def independent_mean_logprob(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Σ log_softmax(model(ids).logits) over the labelled tokens of one unpadded row, and their count."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    picked = [float(logp[i, labels[i + 1]]) for i in range(len(ids) - 1) if labels[i + 1] != -100]
    return sum(picked), len(picked)


def loop_rrhf(responses: list[list[tuple[float, int]]], scores: list[list[float]], w: float, alpha: float):
    """RRHF's loss per prompt by plain loops, from (summed log-prob, length) per response."""
    out = []
    for answers, values in zip(responses, scores, strict=True):
        p = [s / n**alpha for s, n in answers]
        pairs = [(i, j) for i in range(len(p)) for j in range(len(p)) if values[i] < values[j]]
        rank = sum(max(0.0, p[i] - p[j]) for i, j in pairs)
        best = values.index(max(values))
        out.append(w * rank - answers[best][0] / answers[best][1])
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: a soft-capped head
def test_stage_loss_equals_one_from_model_logits(tok, family):
    from families import build_family

    from rlhf_cli.schema_rrhf import RRHFSection
    from rlhf_cli.stages.rrhf import RRHFObjective, rrhf_step_loss

    model = build_family(family)
    examples, _ = ranked(ROWS, tok)
    batch = pad_ranked([examples[0], examples[1]], tok.pad_token_id)
    section = RRHFSection(length_penalty=0.7, rank_weight=2.0)
    with torch.no_grad():
        loss, metrics = rrhf_step_loss(RRHFObjective(model), batch, section=section)
    per_response = [[independent_mean_logprob(model, e[f"response{i}_input_ids"], e[f"response{i}_labels"])
                     for i in range(e["num_responses"])] for e in (examples[0], examples[1])]
    expected = loop_rrhf(per_response, [examples[0]["scores"], examples[1]["scores"]], 2.0, 0.7)
    assert float(loss) == pytest.approx(sum(expected), rel=1e-5, abs=1e-5)
    assert metrics["_pairs"] == 3 + 1


# ------------------------------------------------------------------------- the command

def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sampled_rows(n: int) -> list[dict]:
    """Scored samples of the sort task as `rlhf generate` writes them (K = 3)."""
    from rlhf_cli.builtin.tasks import sort_reward

    letters = ["cba", "dca", "fed", "bda", "gec", "hfa", "lkj", "ihg"]
    rows = []
    for i in range(n):
        word = letters[i % len(letters)]
        prompt, responses = f"sort {word} =", [" " + "".join(sorted(word)), " " + word, " " + word[:2]]
        scores = sort_reward([prompt] * 3, responses)
        rows.append({"prompt": prompt, "responses": responses, "scores": scores})
    return rows


QUICK = ["--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "train.log_every=1",
         "--set", "train.eval_every=null", "--set", "train.eval_reward_fn=null", "--set", "data.eval=null",
         "--set", "train.warmup_steps=0"]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["lengths differ", "one response", "nan score"])
def test_bad_rows_stop_the_command_with_one_error_line(in_process, tmp_path, capsys, index):
    rows = sampled_rows(3)
    rows[2] = {**BAD_ROWS[index][0], "prompt": "sort cba ="}
    data = write_rows(tmp_path / "samples.jsonl", rows)
    code = in_process("rrhf", "--recipe", str(REPO / "recipes" / "tiny-rrhf.yaml"), *QUICK,
                      "--set", f"data.train={data}", "-o", "run")
    assert code == 2
    error = error_line(capsys.readouterr().err)
    assert "samples.jsonl:3: " in error and BAD_ROWS[index][1] in error, error
    assert not (tmp_path / "run" / "final").exists()


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(in_process, tmp_path, capsys):
    data = write_rows(tmp_path / "samples.jsonl", sampled_rows(16))
    args = ["rrhf", "--recipe", str(REPO / "recipes" / "tiny-rrhf.yaml"), *QUICK,
            "--set", f"data.train={data}", "--set", "train.save_every=2"]
    assert in_process(*args, "-o", "straight") == 0
    assert in_process(*args, "-o", "run") == 0
    run = tmp_path / "run"
    # As if killed after step 2's checkpoint (the only one: the last step saves final/ instead).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    shutil.rmtree(run / "final")
    assert in_process(*args, "-o", "run", "--resume") == 0
    assert "(step 2)" in capsys.readouterr().err.replace("  ", " ")
    rows, expected = train_rows(run), train_rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3, 4]
    for row, want in zip(rows, expected, strict=True):  # all but the machine's figures
        keys = {k for k in want if not k.startswith(VOLATILE) and not k.endswith("_per_sec")}
        assert {"loss", "rank_loss", "sft_loss", "rank_accuracy", "lr", "grad_norm"} <= keys
        assert all(row[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7) for k in keys), (row, want)
        assert 0 <= row["rank_accuracy"] <= 1 and math.isfinite(row["sft_loss"])
    a, b = (weights(r / "final" / "adapter_model.safetensors") for r in (run, tmp_path / "straight"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_preview_json_shows_each_prompt_with_its_scored_responses(in_process, tmp_path, capsys):
    rows = sampled_rows(2)
    data = write_rows(tmp_path / "samples.jsonl", rows)
    assert in_process("preview", "--recipe", str(REPO / "recipes" / "tiny-rrhf.yaml"),
                      "--set", f"data.train={data}", "--n", "1", "--json") == 0
    (item,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {k: item[k] for k in ("prompt", "responses", "scores")} == rows[0]
    assert len(item["responses_input_ids"]) == len(item["responses_labels"]) == 3
    prompt = len(build_tokenizer()(rows[0]["prompt"])["input_ids"])
    for ids, labels in zip(item["responses_input_ids"], item["responses_labels"], strict=True):
        assert labels[:prompt] == [-100] * prompt and labels[prompt:] == ids[prompt:]

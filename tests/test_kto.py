"""KTO (`rlhf dpo` with `dpo.loss_type: kto`): batching, the step's loss by hand, and the CLI.

The loss maths itself is checked in test_algorithms_preference.py; here: the mismatched rows
used for the KL estimate, the step loss against numbers worked out by hand, the metrics'
per-label means, and real runs on paired and unpaired data.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import REPO, eval_rows, rlhf, train_rows

from rlhf_cli.algorithms.preference import KTOLoss
from rlhf_cli.data.sft import IGNORE_INDEX as IGN
from rlhf_cli.data.unpaired import UnpairedView
from rlhf_cli.schema import DPOSection
from rlhf_cli.stages.dpo.kto import (
    collate_unpaired,
    finish_kto_metrics,
    kto_step_loss,
    mismatched,
)

DPO_RECIPE = REPO / "recipes" / "tiny-dpo.yaml"
FAST = ["--set", "dpo.loss_type=kto", "--set", "data.train=builtin:sort:train:512",
        "--set", "data.eval=builtin:sort:eval:100", "--set", "data.max_length=32",
        "--set", "train.log_every=5", "--set", "train.eval_every=30", "--set", "train.save_every=null",
        "--set", "train.eval_reward_fn=null", "--set", "train.batch_size=16"]


def example(prompt: list[int], completion: list[int], label: bool) -> dict:
    return {"input_ids": prompt + completion, "labels": [IGN] * len(prompt) + completion, "label": label}


def test_mismatched_rows_pair_each_prompt_with_the_next_completion():
    batch = [example([1, 10], [20, 21, 2], True), example([1, 11, 12], [22, 2], False),
             example([1], [23, 24, 25, 2], True)]
    rows = mismatched(batch, max_length=5)
    assert [r["input_ids"] for r in rows] == [[1, 10, 22, 2], [1, 11, 12, 23, 24], [1, 20, 21, 2]]
    # Only the completion carries labels; the third is cut at max_length (5 tokens).
    assert rows[1]["labels"] == [IGN, IGN, IGN, 23, 24]
    assert rows[2]["labels"] == [IGN, 20, 21, 2]


def test_collate_puts_the_kl_rows_after_the_examples():
    batch = collate_unpaired([example([1, 10], [20, 2], True), example([1, 11], [21, 2], False)],
                             pad_token_id=3, max_length=8)
    assert batch["input_ids"].tolist() == [[1, 10, 20, 2], [1, 11, 21, 2], [1, 10, 21, 2], [1, 11, 20, 2]]
    assert batch["desirable"].tolist() == [True, False]


def test_pairs_become_two_unpaired_examples_lazily():
    pairs = [{"chosen_input_ids": [1, 5], "chosen_labels": [IGN, 5],
              "rejected_input_ids": [1, 6], "rejected_labels": [IGN, 6]}]
    view = UnpairedView(pairs)
    assert len(view) == 2
    assert view[0] == {"input_ids": [1, 5], "labels": [IGN, 5], "label": True}
    assert view[1]["label"] is False and view[-1]["input_ids"] == [1, 6]
    assert list(view[0:2]) == [view[0], view[1]] and list(view[1::2]) == [view[1]]
    assert isinstance(view[::2], UnpairedView)  # slices stay views, not copies


class TableObjective(torch.nn.Module):
    """A fake objective returning given log-probs per row (policy) or per row (reference)."""

    def __init__(self, policy: list[float], reference: list[float]):
        super().__init__()
        self.policy, self.reference = torch.tensor(policy), torch.tensor(reference)
        self.calls = []

    def forward(self, input_ids, attention_mask, labels, reference: bool = False):
        rows = input_ids[:, 0].long()  # each test row starts with its own index
        self.calls.append((reference, rows.tolist()))
        table = self.reference if reference else self.policy
        return table[rows], torch.ones_like(rows)


def test_step_loss_by_hand():
    # Rows 0, 1: the examples (desirable, undesirable); rows 2, 3: their mismatched KL rows.
    model = TableObjective(policy=[-2.0, -5.0, -3.0, -4.0], reference=[-3.0, -4.0, -4.0, -4.2])
    batch = {"input_ids": torch.tensor([[0], [1], [2], [3]]), "attention_mask": torch.ones(4, 1),
             "labels": torch.zeros(4, 1), "desirable": torch.tensor([True, False])}
    cfg = DPOSection(loss_type="kto", beta=0.5, kto_desirable_weight=1.0, kto_undesirable_weight=2.0)
    loss, metrics = kto_step_loss(model, batch, loss=KTOLoss.from_recipe(cfg))
    # z = mean(-3 - -4, -4 - -4.2) = mean(1.0, 0.2) = 0.6; r = (1.0, -1.0)
    # desirable: 1 - σ(0.5 (1.0 - 0.6)) = 1 - σ(0.2) = 0.450166
    # undesirable: 2 (1 - σ(0.5 (0.6 - -1.0))) = 2 (1 - σ(0.8)) = 0.620051
    assert float(loss) == pytest.approx(0.450166 + 0.620051, abs=1e-5)
    assert metrics["kl"] == pytest.approx(0.6 * 2)  # summed per example, the loop divides
    assert metrics["_rewards_desirable"] == pytest.approx(0.5) and metrics["_rewards_undesirable"] == -0.5


def test_step_loss_clamps_a_negative_kl_estimate():
    model = TableObjective(policy=[-2.0, -2.0, -5.0, -5.0], reference=[-2.0, -2.0, -4.0, -4.0])
    batch = {"input_ids": torch.tensor([[0], [1], [2], [3]]), "attention_mask": torch.ones(4, 1),
             "labels": torch.zeros(4, 1), "desirable": torch.tensor([True, True])}
    kto = KTOLoss.from_recipe(DPOSection(loss_type="kto", beta=1.0))
    loss, metrics = kto_step_loss(model, batch, loss=kto)
    assert metrics["kl"] == 0.0  # z = max(-1, 0)
    assert float(loss) == pytest.approx(2 * 0.5)  # r = 0, z = 0: 1 - σ(0) each


def test_metrics_are_means_over_each_label():
    row = finish_kto_metrics({"loss": 0.4, "kl": 1.5, "_desirable": 0.25, "_undesirable": 0.75,
                              "_rewards_desirable": 0.5, "_rewards_undesirable": -0.75,
                              "_logps_desirable": -2.5, "_logps_undesirable": -15.0})
    assert row == pytest.approx({"loss": 0.4, "kl": 1.5, "rewards/chosen": 2.0, "rewards/rejected": -1.0,
                                 "rewards/margins": 3.0, "logps/chosen": -10.0, "logps/rejected": -20.0})


# ---------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def kto_run(rlhf_home, tmp_path_factory):
    run = tmp_path_factory.mktemp("kto") / "run"
    proc = rlhf("dpo", "--recipe", str(DPO_RECIPE), *FAST, "--set", "train.max_steps=60",
                "--output-dir", str(run), cwd=tmp_path_factory.getbasetemp())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, proc


def test_kto_on_pairs_starts_at_one_half_and_learns(kto_run, tmp_path):
    run, proc = kto_run
    assert "1024 unpaired examples" in proc.stdout + proc.stderr
    before, after = eval_rows(run)[0], eval_rows(run)[-1]
    # Policy == reference at step 0: r = 0 and z = 0, so each example's loss is 1 - σ(0).
    assert before["loss"] == pytest.approx(0.5, abs=1e-6)
    assert before["kl"] == pytest.approx(0.0, abs=1e-6)
    assert after["loss"] < 0.48  # 0.46 after 60 steps on pairs with ten kinds of mistakes
    assert after["rewards/margins"] > 0.25  # desirable rewards above undesirable ones
    assert all(math.isfinite(r["loss"]) for r in train_rows(run))
    # Held-out pairs: the implicit reward (against the adapter-disabled reference) ranks them.
    out = tmp_path / "eval.json"
    proc = rlhf("eval", "--model", str(run), "--data", "builtin:sort:eval:100", "--out", str(out),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["accuracy"] >= 0.6  # 0.67 measured; 0.5 is chance


def test_kto_on_unpaired_rows(rlhf_home, tmp_path):
    rows = [{"prompt": f"sort: {w}", "completion": " " + "".join(sorted(w)), "label": True}
            for w in ("dcba", "zyx", "qwe", "mlk")]
    rows += [{"prompt": f"sort: {w}", "completion": " " + w, "label": False} for w in ("fed", "pon")]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = rlhf("dpo", "--recipe", str(DPO_RECIPE), *FAST, "--set", f"data.train={data}",
                "--set", "data.eval=null", "--set", "train.eval_every=null",
                "--set", "train.max_steps=3", "--set", "train.batch_size=3",
                "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kept all 6 rows" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("override, key", [("dpo.precompute_ref=true", "dpo.precompute_ref"),
                                           ("train.batch_size=1", "train.batch_size")])
def test_kto_refuses_what_it_cannot_do(rlhf_home, tmp_path, override, key):
    proc = rlhf("dpo", "--recipe", str(DPO_RECIPE), *FAST, "--set", override,
                "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and key in proc.stderr
    assert "Traceback" not in proc.stderr


def test_preview_of_unpaired_rows_shows_the_completion_and_its_label(rlhf_home, tmp_path):
    data = tmp_path / "kto.jsonl"
    data.write_text(json.dumps({"prompt": "sort: cba", "completion": " abc", "label": True}) + "\n"
                    + json.dumps({"prompt": "sort: fed", "completion": " fed", "label": False}) + "\n")
    proc = rlhf("preview", "--recipe", str(DPO_RECIPE), "--set", "dpo.loss_type=kto",
                "--set", f"data.train={data}", "--n", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(i["loss_text"], i["label"]) for i in items] == [(" abc</s>", True), (" fed</s>", False)]

"""`rm.lm_loss_weight`: the reward model's LM loss on chosen responses, with the base's own head.

A sequence classifier has no LM head; the stage reads the base's `lm_head.weight` from its
safetensors and applies it, frozen, to the RM's hidden states. Checked here against plain
transformers' causal LM loss on the same weights, and through the real CLI.
"""

from __future__ import annotations

import pytest
import torch
from cli_helpers import REPO, eval_rows, rlhf, train_rows
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_cli.data.sft import IGNORE_INDEX as IGN
from rlhf_cli.errors import UserError
from rlhf_cli.models.reward import base_lm_head
from rlhf_cli.stages.rm import RewardObjective, rm_loss

CONFIG = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, pad_token_id=3, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)


@pytest.fixture
def causal_dir(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm", model.eval()


def test_lm_loss_equals_the_causal_lms_own_loss(causal_dir):
    folder, causal = causal_dir
    rm = LlamaForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    objective = RewardObjective(rm, base_lm_head(str(folder), rm))
    ids = torch.tensor([[1, 7, 8, 9, 2, 3], [1, 5, 6, 2, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGN, IGN, 8, 9, 2, IGN], [IGN, 5, 6, 2, IGN, IGN]])
    _, nll = objective(ids, mask, labels)
    with torch.no_grad():
        expected = [float(causal(input_ids=ids[i:i + 1, :n], labels=labels[i:i + 1, :n]).loss)
                    for i, n in enumerate((5, 4))]
    assert nll.tolist() == pytest.approx(expected, rel=1e-5)


def test_rm_loss_adds_the_weighted_chosen_nll(causal_dir):
    folder, _ = causal_dir
    rm = LlamaForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    objective = RewardObjective(rm, base_lm_head(str(folder), rm))
    batch = {"input_ids": torch.tensor([[1, 7, 8, 2], [1, 7, 9, 2]]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.tensor([[IGN, IGN, 8, 2], [IGN, IGN, 9, 2]])}
    plain, _ = rm_loss(objective, batch, margin=0.0, center_weight=0.0)
    mixed, metrics = rm_loss(objective, batch, margin=0.0, center_weight=0.0, lm_loss_weight=0.5)
    chosen_nll = objective(batch["input_ids"][:1], batch["attention_mask"][:1], batch["labels"][:1])[1]
    assert mixed.item() == pytest.approx(plain.item() + 0.5 * chosen_nll.item(), rel=1e-6)
    assert metrics["lm_loss"] == pytest.approx(chosen_nll.item(), rel=1e-6)


def test_a_base_without_an_lm_head_is_a_user_error(tmp_path):
    model = LlamaForSequenceClassification(LlamaConfig(**CONFIG, num_labels=1))
    model.save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match="lm_head.weight"):
        base_lm_head(str(tmp_path / "rm"), model)


def test_rm_with_lm_loss_through_the_cli(rlhf_home, tmp_path):
    run = tmp_path / "run"
    proc = rlhf("rm", "--recipe", str(REPO / "recipes" / "tiny-rm.yaml"), "--set", "rm.lm_loss_weight=1.0",
                "--set", "train.max_steps=20", "--set", "train.eval_every=20", "--set", "train.log_every=5",
                "--set", "data.eval=builtin:sort:eval:50", "--set", "train.save_every=null",
                "--output-dir", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, last = eval_rows(run)[0], eval_rows(run)[-1]
    assert last["lm_loss"] < first["lm_loss"] - 1.0  # the body learns the task's language
    assert all("lm_loss" in r for r in train_rows(run))
    assert (run / "final" / "reward_stats.json").is_file()

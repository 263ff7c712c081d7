"""Dropout in the preference and RL stages (`train.disable_dropout`).

Old log-probs (PPO) and reference log-probs (DPO, KTO) come from eval-mode forwards and the
new ones from train-mode forwards, so any dropout left on makes the first PPO ratio differ
from 1 and the first DPO loss from log 2 before anything was learnt. These stages run with
dropout off by default; SFT keeps the model's own; the key restores either behaviour.

The bases: a tiny GPT-2 written here with every dropout of its config at 0.1 (with the
built-in tokenizer beside it), and the built-in LLaMA, whose config has no dropout; LoRA
dropout is 0.1 on both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, train_rows
from ppo_helpers import OneProcess, experience_of, ppo_recipe, rollout_of, update_once

from rlhf_cli.config import load_recipe
from rlhf_cli.models.arrangement_build import build_arrangement
from rlhf_cli.models.dropout import disable_dropout, dropout_disabled
from rlhf_cli.models.policy import policy_model, tokenizer_for
from rlhf_cli.stages.ppo.optim import ppo_optimizer
from rlhf_cli.stages.rm import RewardObjective, reward_model

DROP = 0.1
DPO_RECIPE = REPO / "recipes" / "tiny-dpo.yaml"
RM_RECIPE = REPO / "recipes" / "tiny-rm.yaml"
SFT_RECIPE = REPO / "recipes" / "tiny-sft.yaml"
LORA_DROPOUT = f"model.lora.dropout={DROP}"


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    """A local GPT-2 directory (attn/resid/embd dropout 0.1) that the CLI loads like any base."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_cli.builtin.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

    config = GPT2Config(vocab_size=-(-VOCAB_SIZE // 8) * 8, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        attn_pdrop=DROP, resid_pdrop=DROP, embd_pdrop=DROP, initializer_range=0.2,
                        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-dropout")
    GPT2LMHeadModel(config).save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


def base_of(name: str, gpt2_base: Path) -> str:
    return str(gpt2_base) if name == "gpt2" else "builtin:tiny"


def randomize_lora_b(model, seed: int = 0) -> None:
    """LoRA B != 0, as after a first update: only then does LoRA's own dropout change outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


# --------------------------------------------------------------------- the key


def test_the_default_depends_on_the_stage_and_the_key_wins():
    for stage, off in (("sft", False), ("rm", True), ("dpo", True), ("ppo", True)):
        reward = "ppo.reward_fn=rlhf_cli.builtin.tasks:sort_reward"  # what a ppo recipe needs
        recipe = load_recipe(DPO_RECIPE, [f"stage={stage}", reward])
        assert dropout_disabled(recipe) is off
        for value in (True, False):
            recipe.train.disable_dropout = value
            assert dropout_disabled(recipe) is value


# ---------------------------------------------------- every kind of dropout, by family


FAMILIES = ("bloom", "falcon", "gpt2", "gpt_neox", "llama", "opt", "phi")


def _family_config(family: str):
    """Tiny configs whose dropout comes in each form: nn.Dropout modules (GPT-2; Phi's and
    GPT-NeoX's residual dropout), floats kept on the modules for F.dropout or the attention
    (`attention_dropout` of LLaMA, Phi and GPT-NeoX; OPT's `dropout` and `layerdrop`; BLOOM's
    `hidden_dropout`) and the config read during the forward (Falcon). Only GPT-2 has its
    dropout off after setting p = 0 on nn.Dropout modules alone."""
    import transformers as tf

    small = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}
    configs = {
        "gpt2": tf.GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, attn_pdrop=DROP,
                              resid_pdrop=DROP, embd_pdrop=DROP, bos_token_id=1, eos_token_id=2),
        "llama": tf.LlamaConfig(**small, intermediate_size=64, attention_dropout=DROP),
        "opt": tf.OPTConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                            ffn_dim=64, word_embed_proj_dim=32, dropout=DROP, attention_dropout=DROP,
                            activation_dropout=DROP, layerdrop=0.5),
        "phi": tf.PhiConfig(**small, intermediate_size=64, resid_pdrop=DROP, embd_pdrop=DROP,
                            attention_dropout=DROP),
        "bloom": tf.BloomConfig(vocab_size=64, hidden_size=32, n_head=4, n_layer=2, hidden_dropout=DROP,
                                attention_dropout=DROP),
        "falcon": tf.FalconConfig(**small, hidden_dropout=DROP, attention_dropout=DROP),
        "gpt_neox": tf.GPTNeoXConfig(**small, intermediate_size=64, hidden_dropout=DROP,
                                     attention_dropout=DROP),
    }
    return configs[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_dropout_makes_the_training_forward_the_eval_forward(family):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_family_config(family), attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=DROP, target_modules="all-linear"))
    randomize_lora_b(model)
    ids = torch.randint(0, 64, (2, 12))

    def logits(train: bool) -> torch.Tensor:
        model.train(train)
        torch.manual_seed(1)
        return model(input_ids=ids).logits

    eval_logits = logits(False)
    assert not torch.equal(logits(True), eval_logits)  # the config's dropout is really on
    assert disable_dropout(model) > 0
    assert torch.equal(logits(True), eval_logits)


# --------------------------------------------------------------------------- PPO


def first_update(base: str, kind: str, *overrides: str):
    """An arrangement whose LoRA B are non-zero (as at any iteration after the first), its
    experience on one rollout, and (train-mode forward, stats of one PPO update)."""
    recipe = ppo_recipe(kind, None, f"model.base={base}", LORA_DROPOUT, "ppo.mini_batch_size=8",
                        "ppo.temperature=1.0", *overrides)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    randomize_lora_b(arrangement)
    ro = rollout_of(arrangement, recipe, tokenizer)
    optimizer = ppo_optimizer(arrangement, recipe)
    backend = OneProcess(arrangement, optimizer)
    scores = torch.randn(ro.input_ids.shape[0], generator=torch.Generator().manual_seed(0))
    experience = experience_of(arrangement, ro, scores, recipe, backend)
    arrangement.train()
    with torch.no_grad():
        logp, values, _ = arrangement(ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = update_once(arrangement, experience, recipe, backend, scheduler)
    return experience, logp, values, stats


@pytest.mark.parametrize("base, kind", [("gpt2", "1base-1lora"), ("gpt2", "1base-2lora"),
                                        ("gpt2", "separate"), ("llama", "1base-1lora"),
                                        ("llama", "2base-2lora")])
def test_ppo_first_update_of_an_iteration_has_ratio_one(base, kind, gpt2_base, rlhf_home):
    experience, logp, values, stats = first_update(base_of(base, gpt2_base), kind)
    mask = experience.response_mask
    assert mask.sum() > 0
    # The training forward (train mode) gives the rollout's old log-probs and values exactly.
    assert torch.equal(logp * mask, experience.old_logprobs * mask)
    assert torch.equal(values * mask, experience.old_values)
    # One minibatch, one epoch: the update's stats are the first update's.
    assert stats["approx_kl"] == 0.0 and stats["clip_frac"] == 0.0


def test_ppo_keeps_dropout_when_asked(gpt2_base, rlhf_home):
    experience, logp, _, stats = first_update(str(gpt2_base), "1base-1lora", "train.disable_dropout=false")
    mask = experience.response_mask
    assert not torch.equal(logp * mask, experience.old_logprobs * mask)
    assert stats["approx_kl"] > 0


# ------------------------------------------------------------------ DPO and KTO


DPO_FAST = ["data.train=builtin:sort:train:64", "data.eval=null", "data.max_length=32",
            "train.max_steps=1", "train.log_every=1", "train.batch_size=8", "train.eval_reward_fn=null",
            "train.save_every=null", "train.eval_every=null", LORA_DROPOUT]


def dpo_run(in_process, out: str, base: str, *overrides: str) -> Path:
    sets = [arg for item in [*DPO_FAST, f"model.base={base}", *overrides] for arg in ("--set", item)]
    assert in_process("dpo", "--recipe", str(DPO_RECIPE), "-o", out, *sets) == 0
    return Path(out)


def first_loss(in_process, base: str, *overrides: str) -> float:
    return train_rows(dpo_run(in_process, "run", base, *overrides))[0]["loss"]


def test_dpo_first_loss_is_log_2(gpt2_base, in_process):
    # The policy starts equal to its reference (LoRA B = 0): Δ = 0 and −log σ(0) = log 2. (LoRA's
    # own dropout cannot change this first loss: B = 0; the PPO tests above cover it.)
    assert first_loss(in_process, str(gpt2_base)) == pytest.approx(math.log(2), abs=1e-7)


def test_full_fine_tuning_dpo_starts_at_log_2_and_saves_dropout_0(gpt2_base, in_process):
    # Without LoRA the reference is a frozen copy of the policy, made after dropout was set to 0.
    run = dpo_run(in_process, "run", str(gpt2_base), "model.lora=null", "train.lr=1e-5")
    assert train_rows(run)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    config = json.loads((run / "final" / "config.json").read_text())
    assert (config["attn_pdrop"], config["resid_pdrop"], config["embd_pdrop"]) == (0.0, 0.0, 0.0)


def test_kto_first_loss_is_one_half(gpt2_base, in_process):
    # r = 0 and z = 0 at the start: every example's loss is λ(1 − σ(0)) = 0.5.
    loss = first_loss(in_process, str(gpt2_base), "dpo.loss_type=kto")
    assert loss == pytest.approx(0.5, abs=1e-7)


def test_dpo_keeps_dropout_when_asked(gpt2_base, in_process):
    loss = first_loss(in_process, str(gpt2_base), "train.disable_dropout=false")
    assert abs(loss - math.log(2)) > 1e-4


def test_switched_off_lora_dropout_trains_and_saves_as_lora_dropout_0(gpt2_base, in_process):
    """peft builds nn.Identity for lora.dropout 0 and nn.Dropout for 0.1 (here set to p = 0):
    the same adapter weights after training; adapter_config.json keeps the recipe's value."""
    from safetensors.torch import load_file

    adapters = {}
    for dropout in (0.0, DROP):
        final = dpo_run(in_process, f"run-{dropout}", str(gpt2_base), "train.max_steps=2",
                        f"model.lora.dropout={dropout}") / "final"
        assert json.loads((final / "adapter_config.json").read_text())["lora_dropout"] == dropout
        adapters[dropout] = load_file(str(final / "adapter_model.safetensors"))
    assert adapters[0.0].keys() == adapters[DROP].keys()
    assert all(torch.equal(adapters[0.0][k], adapters[DROP][k]) for k in adapters[0.0])
    assert any(v.abs().sum() > 0 for k, v in adapters[0.0].items() if "lora_B" in k)  # it trained


# ------------------------------------------------------------------------- RM


def rm_rewards_train_and_eval(recipe):
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    objective = RewardObjective(reward_model(recipe, tokenizer, announce=False))
    randomize_lora_b(objective)
    ids = torch.randint(4, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        trained = objective.train()(ids, mask)[0]
        evaluated = objective.eval()(ids, mask)[0]
    return trained, evaluated


def test_rm_scores_pairs_as_it_evaluates_them(gpt2_base, rlhf_home):
    recipe = load_recipe(RM_RECIPE, [f"model.base={gpt2_base}", LORA_DROPOUT])
    trained, evaluated = rm_rewards_train_and_eval(recipe)
    assert torch.equal(trained, evaluated)
    recipe.train.disable_dropout = False
    trained, evaluated = rm_rewards_train_and_eval(recipe)
    assert not torch.equal(trained, evaluated)


# ------------------------------------------------------------------------ SFT


def sft_train_and_eval_logits(recipe):
    torch.manual_seed(0)
    lm = policy_model(recipe, announce=False)
    randomize_lora_b(lm)
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return lm.train()(input_ids=ids).logits, lm.eval()(input_ids=ids).logits


def test_sft_keeps_the_models_dropout_unless_asked(gpt2_base, rlhf_home):
    recipe = load_recipe(SFT_RECIPE, [f"model.base={gpt2_base}", LORA_DROPOUT])
    trained, evaluated = sft_train_and_eval_logits(recipe)
    assert not torch.equal(trained, evaluated)
    recipe.train.disable_dropout = True
    trained, evaluated = sft_train_and_eval_logits(recipe)
    assert torch.equal(trained, evaluated)

"""Under the PPO arrangements, in process on the built-in tiny model: the adapter plumbing
(switching adapters, disabling them, gradient checkpointing under the critic's adapter, an RM
from another base) and the rollout (which tokens count, sampling from the policy).

The reward model is conftest.py's `rm_run`; the helpers are ppo_helpers.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ppo_helpers import flags, ppo_recipe, rollout_of

from rlhf_cli.data.prompt_data import build_prompt_dataset
from rlhf_cli.engine.rollout import response_mask_of, sample
from rlhf_cli.errors import UserError
from rlhf_cli.models.adapters import CRITIC, REWARD, active_adapters, adapters_disabled, using_adapter
from rlhf_cli.models.arrangement_build import build_arrangement
from rlhf_cli.models.policy import tokenizer_for

# --------------------------------------------------------------------- adapter plumbing


def test_checkpointed_critic_recomputes_under_its_own_adapter(rm_run):
    """1base-2lora runs the critic under another adapter inside the forward; gradient
    checkpointing must recompute it under that adapter too (same gradients as without)."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        recipe = ppo_recipe("1base-2lora", rm_run, f"model.gradient_checkpointing={checkpointing}",
                            "model.lora.dropout=0.0")
        tokenizer = tokenizer_for(recipe)
        torch.manual_seed(0)
        arrangement = build_arrangement(recipe, tokenizer)
        with torch.no_grad():  # a policy adapter unlike the critic's
            for name, param in arrangement.named_parameters():
                if "lora_B.default" in name:
                    param.normal_(0, 0.05)
        ro = rollout_of(arrangement, recipe, tokenizer, n=4)
        arrangement.train()
        logp, values, _ = arrangement(ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
        (logp.sum() + values.sum()).backward()
        return {n: p.grad for n, p in arrangement.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any(f".{CRITIC}." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_using_adapter_switches_routing_and_keeps_flags(rm_run):
    recipe = ppo_recipe("1base-2lora", rm_run)
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    actor = arrangement.actor
    before = flags(actor)
    ids = torch.tensor([[1, 70, 71, 72, 73]])
    actor.eval()
    with torch.no_grad():
        policy = actor(input_ids=ids).logits
        with using_adapter(actor, REWARD):
            assert active_adapters(actor) == [REWARD] and flags(actor) == before
            reward = actor(input_ids=ids).logits
        assert active_adapters(actor) == ["default"] and flags(actor) == before
        assert torch.equal(actor(input_ids=ids).logits, policy) and not torch.equal(reward, policy)
        with pytest.raises(RuntimeError), using_adapter(actor, CRITIC):
            raise RuntimeError("inside")
    assert active_adapters(actor) == ["default"] and flags(actor) == before


def test_disabling_adapters_keeps_a_second_adapter_trainable(rm_run):
    """peft's disable_adapter re-enables only the active adapter: the critic would freeze."""
    recipe = ppo_recipe("1base-2lora", rm_run)
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    before = flags(arrangement.actor)
    assert any(flag for name, flag in before.items() if f".{CRITIC}." in name)
    with adapters_disabled(arrangement.actor):
        pass
    assert flags(arrangement.actor) == before


def test_rm_from_another_base_is_a_user_error(rm_run, tmp_path):
    other = tmp_path / "other-base"  # the same weights under another name: still refused
    shutil.copytree(Path(json.loads((rm_run / "final" / "adapter_config.json").read_text())
                         ["base_model_name_or_path"]), other)
    for kind in ("1base-1lora", "1base-2lora"):
        recipe = ppo_recipe(kind, rm_run, f"model.base={other}")
        with pytest.raises(UserError, match="was trained on .* one-base arrangements need the same base"):
            build_arrangement(recipe, tokenizer_for(recipe))
    recipe = ppo_recipe("2base-2lora", rm_run, f"model.base={other}")
    assert build_arrangement(recipe, tokenizer_for(recipe)).name == "2base-2lora"


# ------------------------------------------------------------------------------ rollout


def test_response_mask_covers_up_to_the_first_eos():
    eos = 2
    tokens = torch.tensor([
        [5, 2, 7, 2],  # EOS second: it counts, everything after it does not
        [5, 6, 7, 8],  # no EOS: all of it counts, and the row has not ended
        [2, 2, 9, 9],  # EOS first
        [5, 6, 7, 2],  # EOS last
    ])
    mask, ended = response_mask_of(tokens, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False, True, True]


def test_rollout_samples_from_the_policy_not_the_generation_config(rlhf_home):
    """A model's generation_config (LLaMA 2 ships temperature 0.6, top_p 0.9) must not
    change what PPO samples: here top_k = 1 would make every sample greedy."""
    recipe = ppo_recipe("1base-1lora", None)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    arrangement.actor.generation_config.top_k = 1
    arrangement.actor.generation_config.temperature = 0.05
    rows = [{"prompt": "sort dcba ="}] * 8
    examples, _ = build_prompt_dataset(rows, tokenizer, "plain", 36, "test")
    torch.manual_seed(0)
    ro = sample(arrangement, examples, tokenizer, recipe.ppo, torch.device("cpu"))
    assert len({tuple(row.tolist()) for row in ro.tokens}) > 1
    # Layout: left-padded prompt | response, masked after the first EOS, pad there.
    assert ro.input_ids.shape[1] == ro.prompt_width + ro.tokens.shape[1]
    assert torch.equal(ro.attention_mask[:, ro.prompt_width:], ro.response_mask.long())
    assert (ro.tokens[ro.response_mask == 0] == tokenizer.pad_token_id).all()

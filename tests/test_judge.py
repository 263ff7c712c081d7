"""`make_judge`: the one judge of the sampling stages (generate, rft, online DPO).

An RM trained with LoRA on the policy's base is attached to the policy as a frozen adapter:
its scores must equal the RM's own (as `rlhf eval` loads it, a separate model), the policy's
outputs must not move, and saving the policy must not save the judge. The RM is conftest.py's
`rm_run` (random non-zero LoRA with dropout 0.3, so a missing eval mode would show).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ppo_helpers import RECIPE, rm_own_scores, rollout_of

from rlhf_cli.config import load_recipe
from rlhf_cli.engine.final_model import save_final_model
from rlhf_cli.engine.judge import make_judge
from rlhf_cli.engine.rollout import PlainPolicy, decode_responses
from rlhf_cli.errors import UserError
from rlhf_cli.models.loading import add_lora, load_causal_lm
from rlhf_cli.models.policy import tokenizer_for


@pytest.fixture(scope="module")
def setting(rlhf_home):
    recipe = load_recipe(RECIPE)
    return recipe, tokenizer_for(recipe)


def lora_policy(recipe):
    torch.manual_seed(1)
    policy = add_lora(load_causal_lm(recipe.model), recipe.model.lora)
    with torch.no_grad():  # a trained-looking adapter: the policy differs from its base
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy


def logits_of(policy, ro) -> torch.Tensor:
    policy.eval()
    with torch.no_grad():
        return policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits


def test_rm_on_the_policys_base_is_a_frozen_adapter_scoring_as_the_rm(setting, rm_run, tmp_path):
    recipe, tokenizer = setting
    policy = lora_policy(recipe)
    ro = rollout_of(PlainPolicy(policy), recipe, tokenizer)
    before = logits_of(policy, ro)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}

    judge = make_judge(None, str(rm_run), key_prefix="rft", model_section=recipe.model,
                       tokenizer=tokenizer, policy=policy)
    assert set(policy.peft_config) == {"default", "reward"}  # on the policy's own base
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    policy.train()  # the judge must switch the RM adapter's dropout off itself
    scores = judge(ro, decode_responses(ro, tokenizer))
    assert policy.training
    own = rm_own_scores(rm_run, ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(scores, own, rtol=0, atol=1e-5)
    assert scores.std() > 0
    assert torch.equal(logits_of(policy, ro), before)  # the policy's adapter is still the active one

    # A separately loaded RM (no policy to attach to) scores the same.
    separate = make_judge(None, str(rm_run), key_prefix="rft", model_section=recipe.model,
                          tokenizer=tokenizer)
    torch.testing.assert_close(separate(ro, decode_responses(ro, tokenizer)), own, rtol=0, atol=1e-5)

    # Saving the policy writes its own adapter only.
    backend = SimpleNamespace(full_state_dict=lambda m: m.state_dict(), is_main=True,
                              unwrap=lambda m: m, barrier=lambda: None)
    final = save_final_model(backend, policy, lambda m: m, tokenizer, tmp_path / "final", prefix="")
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "reward").exists(), sorted(p.name for p in final.iterdir())


def test_a_policy_without_adapters_gets_a_separate_rm(setting, rm_run):
    recipe, tokenizer = setting
    plain = load_causal_lm(recipe.model)
    ro = rollout_of(PlainPolicy(plain), recipe, tokenizer)
    judge = make_judge(None, str(rm_run), key_prefix="--", model_section=recipe.model,
                       tokenizer=tokenizer, policy=plain)
    assert not hasattr(plain, "peft_config")
    torch.testing.assert_close(judge(ro, decode_responses(ro, tokenizer)),
                               rm_own_scores(rm_run, ro.input_ids, ro.attention_mask), rtol=0, atol=1e-5)


def write_fn(tmp_path, body: str) -> str:
    path = tmp_path / "judges.py"
    path.write_text(f"def score(prompts, responses):\n    {body}\n")
    return f"{path}:score"


@pytest.mark.parametrize("body,message", [
    ("return [1.0] * (len(responses) + 1)", "returned 9 scores for 8 responses"),
    ("return [float('nan')] * len(responses)", "NaN or infinite"),
])
def test_a_function_judge_with_wrong_scores_is_a_user_error(setting, tmp_path, body, message):
    recipe, tokenizer = setting
    ro = rollout_of(PlainPolicy(load_causal_lm(recipe.model)), recipe, tokenizer)
    judge = make_judge(write_fn(tmp_path, body), None, key_prefix="--", model_section=recipe.model,
                       tokenizer=tokenizer)
    with pytest.raises(UserError, match=message):
        judge(ro, decode_responses(ro, tokenizer))


def test_a_model_judge_with_nan_scores_is_a_user_error(setting, rm_run, monkeypatch):
    from rlhf_cli.models import reward_judge

    recipe, tokenizer = setting
    monkeypatch.setattr(reward_judge, "score_sequences",
                        lambda model, ids, mask: torch.full((ids.shape[0],), float("nan")))
    judge = make_judge(None, str(rm_run), key_prefix="dpo", model_section=recipe.model, tokenizer=tokenizer)
    ro = rollout_of(PlainPolicy(load_causal_lm(recipe.model)), recipe, tokenizer, n=2)
    with pytest.raises(UserError, match="dpo.reward_model: the judge returned a NaN"):
        judge(ro, decode_responses(ro, tokenizer))


def test_judge_choice(setting, rm_run):
    recipe, tokenizer = setting
    assert make_judge(None, None, key_prefix="rft", model_section=recipe.model, tokenizer=tokenizer) is None
    with pytest.raises(UserError, match="give one judge, rft.reward_model or rft.reward_fn"):
        make_judge("rlhf_cli.builtin.tasks:sort_reward", str(rm_run), key_prefix="rft",
                   model_section=recipe.model, tokenizer=tokenizer)
    with pytest.raises(UserError, match="--reward-model: reward model not found"):
        make_judge(None, "/nonexistent/rm", key_prefix="--", model_section=recipe.model, tokenizer=tokenizer)

"""PPO-max's keys (MOSS-RLHF, "Secrets of RLHF in LLMs, Part I"), each against numbers worked by
hand or computed another way: running reward moments, reward scaling/centering, advantage
clip, entropy bonus, dual clip, the critic's own learning rate and Adam settings."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from cli_helpers import REPO
from ppo_helpers import RECIPE, OneProcess, rollout_of

from rlhf_cli.algorithms.running import RunningMoments, batch_moments, combine
from rlhf_cli.config import load_recipe
from rlhf_cli.errors import UserError
from rlhf_cli.models.arrangement_build import build_arrangement
from rlhf_cli.models.decoder import position_ids_from
from rlhf_cli.models.policy import tokenizer_for
from rlhf_cli.stages.ppo.experience import Experience, make_experience, shape_scores, with_advantages
from rlhf_cli.stages.ppo.optim import ppo_optimizer
from rlhf_cli.stages.ppo.plan import ppo_plan
from rlhf_cli.stages.ppo.reward_scaling import RunningRewards
from rlhf_cli.stages.ppo.update import minibatch_loss


def recipe_with(*overrides: str):
    return load_recipe(RECIPE, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1",
                                "model.lora.dropout=0.0", *overrides])


class Ranks(OneProcess):
    """A backend whose all-reduce adds `others` (the same sums from every other rank) to this one's."""

    def __init__(self, others: int = 0):
        super().__init__(None, None)
        self.others = others

    def all_reduce_sum(self, value):
        return value * (1 + self.others)


# ------------------------------------------------------------------- running moments


def test_running_moments_of_two_batches_are_those_of_the_whole_stream():
    # [1, 2, 3] then [5, 7]: the stream of 5 has mean 18/5 = 3.6 and
    # M2 = 2.6² + 1.6² + 0.6² + 1.4² + 3.4² = 6.76 + 2.56 + 0.36 + 1.96 + 11.56 = 23.2,
    # unbiased std sqrt(23.2 / 4) = sqrt(5.8).
    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen yet: nothing to scale by
    moments.update((6.0, 14.0, 3.0))  # Σx, Σx², n of [1, 2, 3]
    assert (moments.count, moments.mean, moments.m2, moments.std) == (3.0, 2.0, 2.0, 1.0)
    moments.update((12.0, 74.0, 2.0))  # of [5, 7]
    assert moments.count == 5.0
    assert moments.mean == pytest.approx(3.6, abs=1e-12)
    assert moments.m2 == pytest.approx(23.2, abs=1e-12)
    assert moments.std == pytest.approx(math.sqrt(5.8), abs=1e-12)
    again = RunningMoments()
    again.load_state_dict(moments.state_dict())
    assert again.state_dict() == moments.state_dict() and again.std == moments.std


def test_chan_merge_by_hand():
    # [1, 3] (n 2, mean 2, M2 2) with [10] (n 1, mean 10, M2 0): δ = 8, mean 2 + 8/3,
    # M2 = 2 + 0 + 64·2·1/3 = 2 + 128/3 — the moments of [1, 3, 10]: mean 14/3,
    # M2 = (11/3)² + (5/3)² + (16/3)² = (121 + 25 + 256)/9 = 402/9.
    n, mean, m2 = combine(batch_moments((4.0, 10.0, 2.0)), batch_moments((10.0, 100.0, 1.0)))
    assert (n, mean, m2) == (3.0, pytest.approx(14 / 3), pytest.approx(402 / 9))
    assert combine((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------ reward scaling/centering


@pytest.mark.parametrize("keys, second", [
    (["ppo.reward_scaling=true"], [5 / math.sqrt(5.8), 7 / math.sqrt(5.8)]),
    (["ppo.reward_centering=true"], [1.4, 3.4]),
    (["ppo.reward_scaling=true", "ppo.reward_centering=true"], [1.4 / math.sqrt(5.8), 3.4 / math.sqrt(5.8)]),
], ids=["scale", "centre", "both"])
def test_scores_are_scaled_by_the_moments_of_every_score_so_far(keys, second):
    running = RunningRewards(recipe_with(*keys).ppo, Ranks())
    first = running(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, std 1
    expected_first = [-1.0, 0.0, 1.0] if "ppo.reward_centering=true" in keys else [1.0, 2.0, 3.0]
    assert first.tolist() == pytest.approx(expected_first, abs=1e-6)
    assert running(torch.tensor([5.0, 7.0])).tolist() == pytest.approx(second, abs=1e-6)
    assert running.stats() == {"reward_running_mean": pytest.approx(3.6),
                               "reward_running_std": pytest.approx(math.sqrt(5.8))}


def test_running_moments_are_summed_over_processes():
    # Two ranks that each score [1, 2, 3]: n 6, Σx 12, Σx² 28 -> mean 2, M2 = 28 − 12·2 = 4,
    # std sqrt(4/5) (one rank alone: std 1).
    running = RunningRewards(recipe_with("ppo.reward_scaling=true").ppo, Ranks(others=1))
    out = running(torch.tensor([1.0, 2.0, 3.0]))
    assert out.tolist() == pytest.approx([v / math.sqrt(0.8) for v in (1.0, 2.0, 3.0)], abs=1e-6)


def test_scores_are_penalised_then_normalised_then_clipped():
    # Scores [4, 0], the second without EOS (penalty −1): [4, −1]; mean 1.5,
    # M2 = 2.5² + 2.5² = 12.5, std sqrt(12.5): ±2.5/sqrt(12.5) = ±0.7071; clipped to ±0.5.
    ppo = recipe_with("ppo.reward_scaling=true", "ppo.reward_centering=true", "ppo.no_eos_penalty=-1",
                      "ppo.reward_clip=0.5").ppo
    running = RunningRewards(ppo, Ranks())
    shaped = shape_scores(torch.tensor([4.0, 0.0]), torch.tensor([True, False]), ppo, None, running=running)
    assert shaped.tolist() == [0.5, -0.5]
    assert running.moments.mean == 1.5 and running.moments.m2 == 12.5
    ppo = dataclasses.replace(ppo, reward_clip=10.0)
    shaped = shape_scores(torch.tensor([4.0, 0.0]), torch.tensor([True, False]), ppo, None,
                          running=RunningRewards(ppo, Ranks()))
    assert shaped.tolist() == pytest.approx([2.5 / math.sqrt(12.5), -2.5 / math.sqrt(12.5)], abs=1e-6)


# ------------------------------------------------------------------- advantage clip


def _one_token_rows(scores: list[float]) -> Experience:
    """Rows of one response token (a second, padded column), KL 0: REINFORCE++'s advantage of
    a row is its whitened score."""
    n = len(scores)
    mask = torch.tensor([[1.0, 0.0]] * n)
    zeros = torch.zeros(n, 2)
    return Experience(input_ids=torch.zeros(n, 3, dtype=torch.long), attention_mask=torch.ones(n, 3),
                      tokens=torch.zeros(n, 2, dtype=torch.long), response_mask=mask, prompt_width=1,
                      old_logprobs=zeros, ref_logprobs=zeros, old_values=None, kl=zeros,
                      rewards=torch.tensor(scores), kl_per_response=torch.zeros(n))


def test_advantages_are_clipped_after_whitening():
    # Scores [0.1, −0.1, 3, −3]: mean 0, unbiased variance (0.01 + 0.01 + 9 + 9)/3 = 6.00667,
    # std 2.450850: whitened [0.040802, −0.040802, 1.224065, −1.224065]; clip 0.5.
    clipped = recipe_with("ppo.advantage=reinforce_pp", "ppo.advantage_clip=0.5").ppo
    out = with_advantages(_one_token_rows([0.1, -0.1, 3.0, -3.0]), clipped, 0.0, Ranks()).advantages
    assert out[:, 0].tolist() == pytest.approx([0.040802, -0.040802, 0.5, -0.5], abs=1e-6)
    assert out[:, 1].tolist() == [0.0] * 4  # off the mask it stays 0
    plain = dataclasses.replace(clipped, advantage_clip=None)
    out = with_advantages(_one_token_rows([0.1, -0.1, 3.0, -3.0]), plain, 0.0, Ranks()).advantages
    assert out[:, 0].tolist() == pytest.approx([0.040802, -0.040802, 1.224065, -1.224065], abs=1e-6)


# ------------------------------------------------------------ entropy bonus, dual clip


def _built(*overrides: str):
    """A 1base-2lora arrangement whose actor differs from the base, and its experience."""
    recipe = recipe_with("ppo.arrangement=1base-2lora", *overrides)
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    arrangement = build_arrangement(recipe, tokenizer)
    with torch.no_grad():
        for name, param in arrangement.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rollout = rollout_of(arrangement, recipe, tokenizer)
    backend = OneProcess(arrangement, ppo_optimizer(arrangement, recipe))
    experience = make_experience(arrangement, rollout, torch.linspace(-1.0, 1.0, 8), recipe.ppo, None)
    return recipe, arrangement, with_advantages(experience, recipe.ppo, 0.05, backend)


def _entropy_from_model_logits(arrangement, rows: Experience, temperature: float) -> torch.Tensor:
    """Token-mean entropy of π/T over the response, from the actor's own `model(...).logits`."""
    logits = arrangement.actor(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                               position_ids=position_ids_from(rows.attention_mask)).logits
    logits = logits[:, rows.prompt_width - 1:-1].float() / temperature
    probs = torch.softmax(logits, dim=-1)
    per_token = -(probs * torch.log(probs)).sum(dim=-1)
    return (per_token * rows.response_mask).sum() / rows.response_mask.sum()


def test_entropy_bonus_is_minus_coef_times_entropy_and_raises_it():
    recipe, arrangement, experience = _built("ppo.entropy_coef=0.3")
    arrangement.train()
    lora = [p for n, p in arrangement.actor.named_parameters() if ".default." in n and p.requires_grad]
    with_bonus = minibatch_loss(arrangement, experience, recipe.ppo, 1.0, True)[0]
    without = minibatch_loss(arrangement, experience, dataclasses.replace(recipe.ppo, entropy_coef=0.0), 1.0,
                             True)[0]
    entropy = _entropy_from_model_logits(arrangement, experience, recipe.ppo.temperature)
    assert float((with_bonus - without).detach()) == pytest.approx(-0.3 * float(entropy.detach()), abs=1e-5)
    bonus_grad = torch.autograd.grad(with_bonus - without, lora)
    entropy_grad = torch.autograd.grad(entropy, lora)
    assert any(float(g.abs().max()) > 1e-4 for g in entropy_grad)
    for got, want in zip(bonus_grad, entropy_grad, strict=True):
        torch.testing.assert_close(got, -0.3 * want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # a step down the bonus's gradient raises the entropy
        for param, grad in zip(lora, bonus_grad, strict=True):
            param -= 0.5 * grad
    assert float(_entropy_from_model_logits(arrangement, experience, recipe.ppo.temperature)) > float(entropy)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    # Every token: ratio π/π_old = 5 and A = −1: unclipped −A·5 = 5, clipped −A·1.2 = 1.2,
    # PPO's max 5; the dual clip c = 3 bounds it at −c·A = 3.
    recipe, arrangement, experience = _built("ppo.dual_clip=3")
    arrangement.train()
    with torch.no_grad():
        logp = arrangement(experience.input_ids, experience.attention_mask, experience.prompt_width,
                           experience.tokens)[0]
    rows = dataclasses.replace(experience, old_logprobs=logp - math.log(5.0),
                               advantages=-experience.response_mask)
    _, stats = minibatch_loss(arrangement, rows, recipe.ppo, 1.0, True)
    assert stats["policy_loss"] == pytest.approx(3.0, abs=1e-5) and stats["dual_clip_frac"] == 1.0
    _, stats = minibatch_loss(arrangement, rows, dataclasses.replace(recipe.ppo, dual_clip=None), 1.0, True)
    assert stats["policy_loss"] == pytest.approx(5.0, abs=1e-4) and "dual_clip_frac" not in stats


# ------------------------------------------------------------- the critic's optimizer


def test_the_critic_has_its_own_rate_betas_and_eps():
    recipe = recipe_with("ppo.arrangement=1base-2lora", "train.lr=2e-4", "train.adam_beta2=0.95",
                         "train.adam_eps=1e-6", "ppo.critic_lr=6e-4", "ppo.critic_adam_eps=0.5",
                         "ppo.critic_adam_beta1=0.5")
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    optimizer = ppo_optimizer(arrangement, recipe)
    actor, critic = optimizer.param_groups
    assert (actor["lr"], actor["betas"], actor["eps"]) == (2e-4, (0.9, 0.95), 1e-6)
    assert (critic["lr"], critic["betas"], critic["eps"]) == (6e-4, (0.5, 0.95), 0.5)
    # AdamW's first step with gradient g is −lr·ĝ/(sqrt(v̂) + eps) = −lr·g/(|g| + eps) (bias-
    # corrected m̂ = g, v̂ = g²; weight decay 0): g = 0.5 moves the actor by −2e-4·0.5/(0.5 + 1e-6)
    # and the critic, with eps 0.5, by −6e-4·0.5/1.0 = −3e-4.
    before = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.full_like(param, 0.5)
    optimizer.step()
    steps = (-2e-4 * 0.5 / (0.5 + 1e-6), -3e-4)
    for group, old, step in zip(optimizer.param_groups, before, steps, strict=True):
        for param, was in zip(group["params"], old, strict=True):
            torch.testing.assert_close(param.detach() - was, torch.full_like(was, step), atol=5e-7, rtol=0)


def test_critic_lr_ratio_still_sets_the_critic_rate():
    recipe = recipe_with("ppo.arrangement=1base-2lora", "train.lr=2e-4", "ppo.critic_lr_ratio=3")
    critic = ppo_optimizer(build_arrangement(recipe, tokenizer_for(recipe)), recipe).param_groups[1]
    assert (critic["lr"], critic["betas"], critic["eps"]) == (pytest.approx(6e-4), (0.9, 0.999), 1e-8)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("override, pattern", [
    ("ppo.dual_clip=1.0", r"ppo\.dual_clip.*must be > 1"),
    ("ppo.advantage_clip=0", r"ppo\.advantage_clip.*must be > 0"),
    ("ppo.entropy_coef=-0.1", r"ppo\.entropy_coef.*must be >= 0"),
    ("ppo.critic_adam_beta2=1.0", r"ppo\.critic_adam_beta2.*below 1"),
    ("ppo.critic_lr=1e-4", r"ppo\.critic_lr.*1base-1lora"),
    ("ppo.critic_adam_eps=1e-8", r"ppo\.critic_adam_eps.*1base-1lora"),
])
def test_bad_ppo_max_values_name_the_key(override, pattern):
    with pytest.raises(UserError, match=pattern):
        recipe_with(override)


def test_critic_settings_without_a_critic_are_an_error():
    with pytest.raises(UserError, match=r"ppo\.critic_lr.*trains no critic"):
        recipe_with("ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.critic_lr=1e-4")


# ---------------------------------------------------------------- recipes and the plan


def test_the_ppo_max_recipes_turn_the_tricks_on_and_the_plan_says_so():
    tiny = load_recipe(REPO / "recipes" / "tiny-ppo-max.yaml", [])
    big = load_recipe(REPO / "recipes" / "llama2-7b-ppo-max.yaml", [])
    for recipe in (tiny, big):
        ppo = recipe.ppo
        assert ppo.reward_scaling and ppo.reward_centering
        assert recipe.train.adam_beta2 == 0.95 and recipe.train.adam_eps == 1e-6
        assert ppo.critic_adam_eps == 1e-8
        line = next(line for line in ppo_plan(recipe) if line.startswith("PPO-max:"))
        assert "running std" in line and "eps 1e-08" in line
    # The paper's advantage clip and 3x critic rate; the tiny recipe's departures are in its comment.
    assert big.ppo.advantage_clip == 0.5 and big.ppo.critic_lr == pytest.approx(3 * big.train.lr)
    plan = next(line for line in ppo_plan(big) if line.startswith("PPO-max:"))
    assert "advantages clipped to +-0.5" in plan
    assert tiny.ppo.advantage_clip is None and tiny.ppo.critic_lr == pytest.approx(5 * tiny.train.lr)
    assert not any(line.startswith("PPO-max") for line in ppo_plan(load_recipe(RECIPE, [])))

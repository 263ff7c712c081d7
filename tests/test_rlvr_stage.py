"""DAPO / Dr. GRPO in PPO's stage: the keys' error lines, dynamic sampling's rounds and the
batch it lays out, overlong masking, kl_coef 0 without a reference forward, and micro-batches
that accumulate to the same update under every loss aggregation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cli_helpers import REPO, error_line, rlhf
from ppo_helpers import OneProcess
from tensor_helpers import t

from rlhf_cli.config import load_recipe
from rlhf_cli.engine.batching import GlobalBatches
from rlhf_cli.engine.rollout import Rollout
from rlhf_cli.errors import UserError
from rlhf_cli.schema import PPOSection
from rlhf_cli.stages.ppo.dynamic_sampling import DynamicSampling
from rlhf_cli.stages.ppo.experience import Experience, make_experience, shape_scores, with_advantages
from rlhf_cli.stages.ppo.overlong import overlong_masked

GRPO = str(REPO / "recipes" / "tiny-grpo.yaml")


# ------------------------------------------------------------------------ error lines
@pytest.mark.parametrize(("overrides", "key", "text"), [
    (["ppo.clip_range_high=0.1"], "ppo.clip_range_high", "below the low clip range 0.2"),
    (["ppo.clip_range_low=0.3", "ppo.clip_range_high=0.28"], "ppo.clip_range_high", "below the low"),
    (["ppo.dynamic_sampling=true", "ppo.advantage=gae", "ppo.samples_per_prompt=1"],
     "ppo.dynamic_sampling", "set ppo.samples_per_prompt to 2 or more"),
    (["ppo.loss_aggregation=seq-sum"], "ppo.loss_aggregation", "is not one of token-mean"),
    (["ppo.scale_rewards=std"], "ppo.scale_rewards", "is not one of auto, group"),
    (["ppo.advantage=reinforce_pp", "ppo.scale_rewards=none"], "ppo.scale_rewards", "not reinforce_pp's"),
    (["ppo.overlong=penalty"], "ppo.overlong", "set ppo.overlong_buffer"),
    (["ppo.overlong_buffer=4"], "ppo.overlong_buffer", "set ppo.overlong to penalty"),
    (["ppo.overlong=penalty", "ppo.overlong_buffer=13"], "ppo.overlong_buffer", "longer than the responses"),
])
def test_contradicting_keys_name_the_key(overrides, key, text):
    with pytest.raises(UserError, match=rf"{key}: .*{text}"):
        load_recipe(GRPO, overrides)


def test_the_cli_says_one_error_line_and_writes_nothing(tmp_path):
    proc = rlhf("ppo", "--recipe", GRPO, "--set", "ppo.clip_range_high=0.1", "-o", "run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "ppo.clip_range_high" in error_line(proc.stderr)
    assert not (tmp_path / "run").exists()


def test_the_shipped_recipes_load():
    for name in ("tiny-dapo", "tiny-dr-grpo", "qwen2.5-7b-dapo"):
        ppo = load_recipe(REPO / "recipes" / f"{name}.yaml", []).ppo
        assert ppo.kl_coef == 0.0
    dapo = load_recipe(REPO / "recipes" / "tiny-dapo.yaml", []).ppo
    assert (dapo.clip_low, dapo.clip_high, dapo.dynamic_sampling) == (0.2, 0.28, True)
    assert (dapo.overlong, dapo.overlong_buffer) == ("penalty", 3)
    dr = load_recipe(REPO / "recipes" / "tiny-dr-grpo.yaml", []).ppo
    assert (dr.scale_rewards, dr.loss_aggregation) == ("none", "seq-mean-token-sum-norm")
    from rlhf_cli.stages.ppo.plan import rlvr_plan

    assert rlvr_plan(dr) == ["DAPO / Dr. GRPO: loss seq-mean-token-sum-norm; group advantages scaled "
                             "by: none; no reference forward (kl_coef 0)"]
    assert rlvr_plan(load_recipe(GRPO, []).ppo) == []


# ------------------------------------------------------------------------ dynamic sampling
G = 2


class FakeSampler:
    """Prompt k (of the 40 named p0..p39) sampled G times: prompt width 2 + round, response
    width 3 + round; row j of prompt k keeps 1 + (k + j) % 3 tokens. Prompts with k % 3 == 0
    score (1, 0): informative; the others (1, 1)."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        round_ = len(self.calls)
        self.calls.append([p["prompt"] for p in prompts])
        width, length = 2 + round_, 3 + round_
        names = [p["prompt"] for p in prompts for _ in range(G)]
        ks = [int(name[1:]) for name in names]
        js = [j for _ in prompts for j in range(G)]
        prompt_ids = torch.tensor([[k + 10] * width for k in ks])
        kept = torch.tensor([1 + (k + j) % 3 for k, j in zip(ks, js, strict=True)])
        mask = (torch.arange(length)[None] < kept[:, None]).float()
        tokens = torch.where(mask.bool(), torch.tensor(ks)[:, None] + 100, torch.zeros_like(mask).long())
        ended = kept < length
        attention = torch.cat([torch.ones_like(prompt_ids), mask.long()], 1)
        return Rollout(torch.cat([prompt_ids, tokens], 1), attention, mask, tokens, width, ended, names)


def fake_score(rollout, index):
    ks = [int(name[1:]) for name in rollout.prompts]
    rows = list(range(len(ks)))
    scores = torch.tensor([1.0 if k % 3 or r % G == 0 else 0.0 for k, r in zip(ks, rows, strict=True)])
    return scores, [f"r{k}" for k in ks]


def dynamic(rounds: int, target: int = 4):
    ppo = PPOSection(reward_fn="m:f", advantage="grpo", samples_per_prompt=G, rollout_batch_size=target,
                     dynamic_sampling=True, max_sampling_rounds=rounds, no_eos_penalty=0.0)
    prompts = [{"prompt": f"p{k}"} for k in range(40)]
    batches = GlobalBatches(40, target, 1, 1, 0, seed=5)
    sampler = FakeSampler()
    backend = OneProcess(None, None)
    return DynamicSampling(ppo, prompts, batches, backend, 5, sampler, fake_score, None, 0), sampler, batches


def test_dynamic_sampling_keeps_informative_groups_until_the_batch_is_full():
    sampling, sampler, batches = dynamic(rounds=20)
    rollout, scores, responses, metrics = sampling(3)
    drawn = [int(name[1:]) for call in sampler.calls for name in call]
    assert sampler.calls[0] == [f"p{k}" for k in batches.micro_batches(3)[0]]  # round 0: the iteration's own
    informative = [k for k in drawn if k % 3 == 0][:4]
    assert len([k for k in drawn if k % 3 == 0]) >= 4 > len([k for k in drawn[:-4] if k % 3 == 0])
    assert rollout.prompts == [f"p{k}" for k in informative for _ in range(G)]
    assert responses == [f"r{k}" for k in informative for _ in range(G)]
    assert scores.tolist() == [1.0, 0.0] * 4
    # frac_reward_zero_std: the share of every group drawn (all rounds) that scored flat
    flat = len([k for k in drawn if k % 3]) / len(drawn)
    assert metrics == {"prompts_drawn": 4.0 * len(sampler.calls), "groups_kept": 4.0,
                       "sampling_rounds": len(sampler.calls), "frac_reward_zero_std": flat}
    assert 0 < flat < 1
    # the rows are laid out as `sample` lays them: prompts left-padded, responses right-padded
    width = rollout.prompt_width
    assert width == 1 + len(sampler.calls)
    for row, k in enumerate(k for k in informative for _ in range(G)):
        prompt = rollout.input_ids[row, :width][rollout.attention_mask[row, :width].bool()]
        assert set(prompt.tolist()) == {k + 10}
        j = row % G
        kept = 1 + (k + j) % 3
        assert rollout.response_mask[row].tolist() == [1.0] * kept + [0.0] * (rollout.tokens.shape[1] - kept)
        assert rollout.tokens[row].tolist() == [k + 100] * kept + [0] * (rollout.tokens.shape[1] - kept)
        assert rollout.attention_mask[row, width:].tolist() == rollout.response_mask[row].long().tolist()


def test_dynamic_sampling_fills_with_dropped_groups_after_the_last_round():
    sampling, sampler, batches = dynamic(rounds=1)
    rollout, scores, _, metrics = sampling(0)
    own = batches.micro_batches(0)[0]
    kept = [k for k in own if k % 3 == 0]
    order = kept + [k for k in own if k % 3]
    assert rollout.prompts == [f"p{k}" for k in order for _ in range(G)]
    assert metrics == {"prompts_drawn": 4.0, "groups_kept": float(len(kept)), "sampling_rounds": 1,
                       "frac_reward_zero_std": (len(own) - len(kept)) / len(own)}


def test_frac_reward_zero_std_counts_the_scores_the_advantages_see():
    """Without dynamic sampling, over the trained batch; a group whose raw scores tie but whose
    no-EOS penalty differs has signal (its grpo advantages are not 0), so it does not count."""
    from types import SimpleNamespace

    from rlhf_cli.algorithms.ppo import grpo_advantages
    from rlhf_cli.stages.ppo.bookkeeping import rollout_means

    ppo = PPOSection(reward_fn="m:f", advantage="grpo", samples_per_prompt=G, no_eos_penalty=-0.5)
    raw, ended = t(1, 1, 0, 0, 1, 1), torch.tensor([True, False, True, True, True, True])
    shaped = shape_scores(raw, ended, ppo, None)
    assert grpo_advantages(shaped, G)[:2].abs().min() > 0.5  # the first group carries signal
    rollout = SimpleNamespace(input_ids=torch.zeros(6, 3), response_mask=torch.ones(6, 2), ended=ended)
    experience = SimpleNamespace(rewards=shaped, kl_per_response=torch.zeros(6))
    means = rollout_means(rollout, raw, experience, ppo, OneProcess(None, None))
    assert means["frac_reward_zero_std"] == pytest.approx(2 / 3)  # groups 2 and 3; raw scores: 3 of 3
    assert means["score"] == pytest.approx(4 / 6)  # the logged score stays the raw one


def test_extra_prompts_are_a_function_of_iteration_and_round():
    first, _, _ = dynamic(rounds=3)
    again, _, _ = dynamic(rounds=3)
    for index in (0, 7):
        assert first.prompt_indices(index, 0) == first.batches.micro_batches(index)[0]
        for r in (1, 2):
            assert first.prompt_indices(index, r) == again.prompt_indices(index, r)
    rounds = [tuple(first.prompt_indices(i, r)) for i in range(5) for r in (1, 2)]
    assert len(set(rounds)) == len(rounds)  # each (iteration, round) draws its own prompts


# ------------------------------------------------------------------------ overlong, kl_coef 0
def experience_for(ended_rows):
    rows, width = len(ended_rows), 3
    zeros = torch.zeros(rows, width)
    return Experience(input_ids=torch.zeros(rows, 4 + width, dtype=torch.long), attention_mask=None,
                      tokens=torch.zeros(rows, width, dtype=torch.long),
                      response_mask=torch.ones(rows, width),
                      prompt_width=4, old_logprobs=zeros, ref_logprobs=zeros, old_values=None, kl=zeros,
                      rewards=t(1, 0, 0, 1), kl_per_response=torch.zeros(rows))


def test_overlong_mask_gives_truncated_responses_no_weight():
    ppo = PPOSection(reward_fn="m:f", advantage="grpo", samples_per_prompt=2, overlong="mask")
    ended = torch.tensor([True, False, True, True])
    masked = overlong_masked(experience_for(ended), ended, ppo)
    assert masked.response_mask.sum(dim=1).tolist() == [3, 0, 3, 3]
    advantages = with_advantages(masked, ppo, 0.0, OneProcess(None, None)).advantages
    assert advantages[1].abs().sum() == 0 and advantages[0].abs().sum() > 0
    ppo.overlong = "none"
    assert torch.equal(overlong_masked(experience_for(ended), ended, ppo).response_mask, torch.ones(4, 3))


def test_the_soft_penalty_is_added_to_the_score():
    ppo = PPOSection(reward_fn="m:f", overlong="penalty", overlong_buffer=4, max_new_tokens=12,
                     no_eos_penalty=-0.5)
    shaped = shape_scores(t(1, 1, 1), torch.tensor([True, True, False]), ppo, None,
                          lengths=torch.tensor([6, 10, 12]))
    torch.testing.assert_close(shaped, t(1.0, 0.5, 1 - 0.5 - 1.0))


class NoReference:
    """An arrangement whose reference must not run."""

    training = False

    def __call__(self, input_ids, attention_mask, prompt_width, tokens, with_entropy=True):
        return torch.full(tokens.shape, -1.5), None, None

    def reference_logprobs(self, *args):
        raise AssertionError("a reference forward with kl_coef 0")

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def test_kl_coef_zero_runs_no_reference_forward():
    long = torch.long
    rollout = Rollout(torch.zeros(2, 5, dtype=long), torch.ones(2, 5, dtype=long), torch.ones(2, 3),
                      torch.zeros(2, 3, dtype=long), 2, torch.tensor([True, True]), ["a", "b"])
    no_kl = PPOSection(reward_fn="m:f", kl_coef=0.0)
    experience = make_experience(NoReference(), rollout, t(1, 0), no_kl, None)
    assert torch.equal(experience.ref_logprobs, experience.old_logprobs)
    assert experience.kl.abs().sum() == 0 and experience.kl_per_response.abs().sum() == 0
    with pytest.raises(AssertionError, match="reference forward"):
        make_experience(NoReference(), rollout, t(1, 0), PPOSection(reward_fn="m:f", kl_coef=0.05), None)


# ------------------------------------------------------------------------ micro-batches
def uneven(experience: Experience) -> Experience:
    """The experience with responses of 1 to 8 tokens (the sampled ones may all be as long)."""
    rows, width = experience.response_mask.shape
    lengths = torch.arange(rows) % width + 1
    keep = (torch.arange(width)[None] < lengths[:, None]).float()
    return dataclasses.replace(experience, response_mask=experience.response_mask * keep)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_same_update_under_each_aggregation(rlhf_home, aggregation):
    """mini_batch_size 4 in micro-batches of 1 = one forward of 4 (same weights after two
    SGD updates, same policy and value losses), and the aggregation reaches the loss: the
    loss differs from the token-mean's on the same experience."""
    from test_ppo_options import recipe_with, setup, updates

    results = {}
    for name, micro in ((aggregation, None), (aggregation, 1), ("token-mean", None)):
        recipe = recipe_with(f"ppo.loss_aggregation={name}", "ppo.clip_range_high=0.28",
                             *([f"ppo.micro_batch_size={micro}"] if micro else []))
        _, arrangement, experience, backend = setup(recipe)
        experience = uneven(experience)
        backend.optimizer = torch.optim.SGD([p for p in arrangement.parameters() if p.requires_grad], lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(backend.optimizer, lambda _: 1.0)
        stats = updates(arrangement, recipe, backend, scheduler)(experience, 0)
        results[name, micro] = stats, {n: p.detach().clone() for n, p in arrangement.named_parameters()
                                       if p.requires_grad}
    (whole_stats, whole), (micro_stats, micro_weights) = results[aggregation, None], results[aggregation, 1]
    for key in ("policy_loss", "value_loss"):
        assert micro_stats[key] == pytest.approx(whole_stats[key], rel=1e-4, abs=1e-6), key
    for name, tensor in whole.items():
        torch.testing.assert_close(micro_weights[name], tensor, rtol=1e-4, atol=1e-6)
    assert results["token-mean", None][0]["value_loss"] != pytest.approx(whole_stats["value_loss"], rel=1e-3)


def test_separate_loads_no_reference_copy_with_kl_coef_zero(rlhf_home):
    from ppo_helpers import ppo_recipe

    from rlhf_cli.models.arrangement_build import build_arrangement
    from rlhf_cli.models.policy import tokenizer_for

    sizes, reference = {}, 0
    for kl in (0.05, 0.0):
        recipe = ppo_recipe("separate", None, "ppo.advantage=grpo", "ppo.samples_per_prompt=2",
                            f"ppo.kl_coef={kl}")
        arrangement = build_arrangement(recipe, tokenizer_for(recipe))
        sizes[kl] = sum(p.numel() for p in arrangement.parameters())
        if kl:
            reference = sum(p.numel() for p in arrangement.reference.parameters())
    assert arrangement.reference is None and reference > 0
    assert sizes[0.0] == sizes[0.05] - reference  # the actor alone: no reference copy
    with pytest.raises(RuntimeError, match="without a reference"):
        arrangement.reference_logprobs(None, None, 0, None)

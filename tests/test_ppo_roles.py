"""PPO arrangements in process, on the built-in tiny model: where each role starts, what a
PPO update may change (only the actor and the critic), and the critic-free estimators (no
critic at all) with the option combinations they refuse.

The reward model is conftest.py's `rm_run`, random but non-zero, so the reward, critic and
reference paths differ from one another and a mix-up shows; the helpers are ppo_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from ppo_helpers import (
    ARRANGEMENTS,
    RECIPE,
    TRAINABLE,
    OneProcess,
    base_logprobs,
    experience_of,
    flags,
    name_groups,
    ppo_recipe,
    rm_own_scores,
    rollout_of,
    trainable_groups,
    update_once,
)

from rlhf_cli.config import load_recipe
from rlhf_cli.errors import UserError
from rlhf_cli.models.adapters import CRITIC
from rlhf_cli.models.arrangement_build import build_arrangement
from rlhf_cli.models.policy import tokenizer_for
from rlhf_cli.stages.ppo.optim import ppo_optimizer

# ------------------------------------------------------------------- where roles start


def assert_actor_starts_at_the_base(arrangement, recipe, ro):
    """The reference is the base model exactly, and the fresh actor LoRA (B = 0) equals it:
    KL 0. Returns the role inputs, the reference log-probs and the actor forward's values."""
    args = (ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
    reference = arrangement.reference_logprobs(*args)
    assert torch.equal(reference, base_logprobs(recipe, ro))
    arrangement.eval()
    with torch.no_grad():
        logp, values, _ = arrangement(*args)
    assert torch.equal(logp, reference)
    return args, reference, values


@pytest.mark.parametrize("kind", ARRANGEMENTS)
def test_roles_start_where_the_design_says(kind, rm_run):
    # Dropout kept (the RM adapter's 0.3): the role methods' own eval mode must be what removes it.
    recipe = ppo_recipe(kind, rm_run, "train.disable_dropout=false")
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    assert trainable_groups(arrangement) == TRAINABLE[kind]
    ro = rollout_of(arrangement, recipe, tokenizer)
    arrangement.train()  # the role methods must switch dropout off themselves
    _, _, values = assert_actor_starts_at_the_base(arrangement, recipe, ro)

    # The reward is the RM's own score (dropout 0.3 in the RM adapter: eval mode matters).
    arrangement.train()
    scores = arrangement.reward_scores(ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(scores, rm_own_scores(rm_run, ro.input_ids, ro.attention_mask),
                               rtol=0, atol=1e-6)
    assert scores.std() > 0

    # The critic starts from the RM: V before the first response token = RM(prompt).
    rm_head = arrangement.reward_head.weight if arrangement.reward_head is not None else None
    if kind == "1base-1lora":  # the shared adapter is the policy's: only the head comes from the RM
        assert torch.equal(arrangement.value_head.weight, rm_head.float())
    else:
        prompt_only = ro.attention_mask.clone()
        prompt_only[:, ro.prompt_width:] = 0
        torch.testing.assert_close(values[:, 0], rm_own_scores(rm_run, ro.input_ids, prompt_only),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ARRANGEMENTS)
def test_reward_function_runs_start_from_the_policy_base(kind, rlhf_home):
    recipe = ppo_recipe(kind, None)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    assert trainable_groups(arrangement) == TRAINABLE[kind]
    assert torch.count_nonzero(arrangement.value_head.weight) == 0
    ro = rollout_of(arrangement, recipe, tokenizer)
    _, _, values = assert_actor_starts_at_the_base(arrangement, recipe, ro)
    assert torch.count_nonzero(values) == 0
    with pytest.raises(UserError, match="no reward model"):
        arrangement.reward_scores(ro.input_ids, ro.attention_mask)


# Each arrangement's own list of what its critic trains (besides the actor's policy adapter).
CRITIC_WEIGHTS = {
    "1base-1lora": {"value_head"},  # + the policy adapter, shared: one optimizer group
    "1base-2lora": {"actor/critic", "value_head"},
    "2base-2lora": {"rm_body/critic", "value_head"},
    "separate": {"critic/default", "value_head"},
}


@pytest.mark.parametrize("kind", ARRANGEMENTS)
def test_each_arrangement_lists_its_actor_and_critic_weights(kind, rlhf_home):
    recipe = ppo_recipe(kind, None, "ppo.critic_lr_ratio=0.5")
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    actor, critic = arrangement.actor_parameters(), arrangement.critic_parameters()
    # The policy adapter, named as the EMA and every checkpoint name it (`actor.` ... `.default.`).
    assert set(actor) == {n for n, p in arrangement.named_parameters()
                          if p.requires_grad and n.startswith("actor.") and ".default." in n}
    assert name_groups(critic) == CRITIC_WEIGHTS[kind] and not actor.keys() & critic.keys()
    assert actor.keys() | critic.keys() == {n for n, p in arrangement.named_parameters() if p.requires_grad}
    shared = kind == "1base-1lora"
    assert arrangement.shares_weights == shared
    assert recipe.ppo.vf_coef != 1.0 and arrangement.vf_coef == (recipe.ppo.vf_coef if shared else 1.0)

    groups = ppo_optimizer(arrangement, recipe).param_groups
    lists = [[*actor.values(), *critic.values()]] if shared else [list(actor.values()), list(critic.values())]
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in ps] for ps in lists]
    assert [g["lr"] for g in groups] == [recipe.train.lr] + ([] if shared else [recipe.train.lr * 0.5])

    # What saving takes from a full state dict: the actor's and the value head's own entries.
    state = arrangement.state_dict()
    assert arrangement.actor_state(state).keys() == arrangement.actor.state_dict().keys()
    assert all(arrangement.actor_state(state)[k.removeprefix("actor.")] is v
               for k, v in state.items() if k.startswith("actor."))
    assert arrangement.value_head_state(state).keys() == {"weight"}

    # A trainable weight neither list names would never train: refused, not ignored.
    arrangement.stray = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="neither the actor's nor the critic's"):
        ppo_optimizer(arrangement, recipe)


# ------------------------------------------------------------- what an update may change


@pytest.mark.parametrize("kind", ARRANGEMENTS)
def test_update_trains_actor_and_critic_only(kind, rm_run):
    recipe = ppo_recipe(kind, rm_run)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    before_flags = flags(arrangement)
    before = {n: p.detach().clone() for n, p in arrangement.named_parameters()}
    ro = rollout_of(arrangement, recipe, tokenizer)
    args = (ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
    scores = arrangement.reward_scores(ro.input_ids, ro.attention_mask)
    reference = arrangement.reference_logprobs(*args)

    optimizer = ppo_optimizer(arrangement, recipe)
    backend = OneProcess(arrangement, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for iteration in range(2):  # the second one sees non-zero LoRA B, so every LoRA A moves too
        experience = experience_of(arrangement, ro, scores, recipe, backend)
        update_once(arrangement, experience, recipe, backend, scheduler, index=iteration)

    assert flags(arrangement) == before_flags  # nothing frozen or unfrozen on the way
    changed = {n for n, p in arrangement.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, flag in before_flags.items() if flag}
    assert changed == trainable
    # The reward and the reference do not move; the actor and the critic do.
    assert torch.equal(arrangement.reward_scores(ro.input_ids, ro.attention_mask), scores)
    torch.testing.assert_close(scores, rm_own_scores(rm_run, ro.input_ids, ro.attention_mask),
                               rtol=0, atol=1e-6)
    assert torch.equal(arrangement.reference_logprobs(*args), reference)
    new_experience = experience_of(arrangement, ro, scores, recipe, backend)
    assert new_experience.kl_per_response.abs().sum() > 0
    assert not torch.equal(new_experience.old_values, experience.old_values)


# ------------------------------------------------------------ critic-free estimators


@pytest.mark.parametrize("kind", ["1base-1lora", "2base-2lora", "separate"])
def test_critic_free_arrangements_train_the_actor_alone(kind, rm_run):
    recipe = ppo_recipe(kind, rm_run, "ppo.advantage=grpo", "ppo.samples_per_prompt=2")
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    # No value head, no critic adapter or model, one optimizer group.
    assert trainable_groups(arrangement) == {"actor/default"}
    assert arrangement.value_head is None and not arrangement.has_critic
    names = [name for name, _ in arrangement.named_parameters()]
    assert not any(f".{CRITIC}." in n or n.startswith(("critic.", "value_head")) for n in names)
    optimizer = ppo_optimizer(arrangement, recipe)
    assert len(optimizer.param_groups) == 1

    ro = rollout_of(arrangement, recipe, tokenizer)
    args, reference, values = assert_actor_starts_at_the_base(arrangement, recipe, ro)
    assert values is None
    scores = arrangement.reward_scores(ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(scores, rm_own_scores(rm_run, ro.input_ids, ro.attention_mask),
                               rtol=0, atol=1e-6)

    before = {n: p.detach().clone() for n, p in arrangement.named_parameters()}
    backend = OneProcess(arrangement, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    experience = experience_of(arrangement, ro, scores, recipe, backend)
    assert experience.old_values is None and experience.advantages.abs().sum() > 0
    stats = update_once(arrangement, experience, recipe, backend, scheduler)
    # Metrics say nothing about a critic that does not exist.
    assert not {"value_loss", "vf_clip_frac", "explained_variance"} & stats.keys()
    assert stats["loss"] == stats["policy_loss"]
    changed = {n for n, p in arrangement.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("actor.") and ".default." in n for n in changed)
    assert torch.equal(arrangement.reward_scores(ro.input_ids, ro.attention_mask), scores)
    assert torch.equal(arrangement.reference_logprobs(*args), reference)


@pytest.mark.parametrize("kind", ["1base-1lora", "separate"])
def test_critic_free_with_a_reward_function(kind, rlhf_home):
    recipe = ppo_recipe(kind, None, "ppo.advantage=rloo", "ppo.samples_per_prompt=2")
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    assert trainable_groups(arrangement) == {"actor/default"} and arrangement.value_head is None
    assert arrangement.critic_parameters() == {} and name_groups(arrangement.actor_parameters()) == {
        "actor/default"}


@pytest.mark.parametrize("overrides, text", [
    (["ppo.advantage=grpo"], "ppo.samples_per_prompt: grpo compares several samples"),
    (["ppo.advantage=rloo", "ppo.samples_per_prompt=1"], "rloo compares several samples"),
    (["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.arrangement=1base-2lora"],
     "1base-2lora's second adapter is the critic"),
    (["ppo.advantage=reinforce_pp", "ppo.arrangement=2base-2lora"], "second base would hold nothing"),
    (["ppo.advantage=reinforce_pp", "ppo.critic_warmup_steps=2"], "trains no critic to warm up"),
    (["ppo.advantage=a2c"], "is not one of gae, grpo, rloo, reinforce_pp"),
    (["ppo.ptx_coef=0.1"], "set `ppo.ptx_data`"),
    (["ppo.ptx_coef=-0.1"], "must be >= 0"),
    (["ppo.ema_decay=1"], "must be below 1"),
    (["ppo.ema_decay=0"], "must be > 0"),
])
def test_option_combinations_that_make_no_sense_are_refused(overrides, text):
    with pytest.raises(UserError, match=text):
        load_recipe(RECIPE, overrides)


def test_critic_free_2base_and_separate_with_a_reward_model_are_accepted(rm_run):
    for kind in ("2base-2lora", "separate"):
        recipe = ppo_recipe(kind, rm_run, "ppo.advantage=reinforce_pp")
        assert recipe.ppo.arrangement == kind


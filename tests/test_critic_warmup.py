"""Critic warm-up (`ppo.critic_warmup_steps`) in process: a warm-up update moves the critic and
leaves every actor weight bitwise unchanged, in every arrangement, with and without the ptx
term and with weight decay on; the actor's Adam state starts only when the actor trains.

Reward-function runs (no RM) with a random non-zero value head and LoRA B, so that every
critic weight gets a gradient and a value loss leaking into the actor would show.
"""

from __future__ import annotations

import pytest
import torch
from ppo_helpers import ARRANGEMENTS, OneProcess, experience_of, ppo_recipe, rollout_of

from rlhf_cli.config import load_recipe
from rlhf_cli.errors import UserError
from rlhf_cli.models.arrangement_build import build_arrangement
from rlhf_cli.models.policy import tokenizer_for
from rlhf_cli.stages.ppo.optim import ppo_optimizer
from rlhf_cli.stages.ppo.ptx import PtxBatches
from rlhf_cli.stages.ppo.update import PPOUpdate

PTX = ["ppo.ptx_coef=0.3", "ppo.ptx_data=builtin:sort:train:16", "ppo.ptx_batch_size=4"]
# Weight decay on: a zero gradient on an actor weight would still shrink it.
WARMUP = ["ppo.critic_warmup_steps=1", "train.weight_decay=0.1", "model.lora.dropout=0.0", *PTX]
UPDATES = 2  # per iteration: 8 responses in minibatches of 4, one epoch


def warm_setup(kind: str):
    recipe = ppo_recipe(kind, None, *WARMUP)
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    arrangement = build_arrangement(recipe, tokenizer)
    with torch.no_grad():
        for name, param in arrangement.named_parameters():
            if "lora_B" in name or name.startswith("value_head."):
                param.normal_(0, 0.05)
    rollout = rollout_of(arrangement, recipe, tokenizer)
    optimizer = ppo_optimizer(arrangement, recipe)
    backend = OneProcess(arrangement, optimizer)
    scores = torch.linspace(-1.0, 1.0, rollout.input_ids.shape[0])
    experience = experience_of(arrangement, rollout, scores, recipe, backend)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ptx = PtxBatches(recipe, tokenizer, backend)
    return recipe, arrangement, experience, backend, scheduler, ptx


def snapshot(params: dict) -> dict:
    return {name: p.detach().clone() for name, p in params.items()}


def assert_warmup_update(arrangement, update, experience, index: int) -> dict:
    """One warm-up iteration: the actor bitwise unchanged with no Adam state, every critic
    weight moved; returns its stats."""
    actor, critic = arrangement.actor_parameters(), arrangement.critic_parameters()
    actor_before, critic_before = snapshot(actor), snapshot(critic)
    stats = update(experience, index)
    moved = [n for n, p in actor.items() if not torch.equal(p, actor_before[n])]
    assert not moved, f"warm-up moved {len(moved)} actor weights, e.g. {moved[:2]}"
    assert all(not update.backend.optimizer.state[p] for p in actor.values())  # no moments, no step
    assert all(not torch.equal(p, critic_before[n]) for n, p in critic.items())
    assert "ptx_loss" not in stats
    assert stats["loss"] == pytest.approx(update.vf_coef * stats["value_loss"])
    return stats


# The default suite keeps the two one-base arrangements (the shared adapter, the second adapter);
# the two-model ones (the same update code, ~45 s each on a loaded machine) run with the slow tests.
@pytest.mark.parametrize("kind", [k if k.startswith("1base") else pytest.param(k, marks=pytest.mark.slow)
                                  for k in ARRANGEMENTS])
def test_warmup_trains_the_critic_alone(kind, rlhf_home):
    recipe, arrangement, experience, backend, scheduler, ptx = warm_setup(kind)
    vf = arrangement.vf_coef
    plain = PPOUpdate(arrangement, recipe.ppo, backend, scheduler, vf_coef=vf, updates_per_iteration=UPDATES)
    assert_warmup_update(arrangement, plain, experience, 0)  # without a ptx term
    with_ptx = PPOUpdate(arrangement, recipe.ppo, backend, scheduler, vf_coef=vf,
                         updates_per_iteration=UPDATES, ptx_batches=ptx)
    assert_warmup_update(arrangement, with_ptx, experience, 0)  # with ptx_coef 0.3 and its data

    # Iteration 1 is past the warm-up: the actor trains, its Adam state starting there (step
    # count 2, not 6), while the critic's has counted every update.
    actor = arrangement.actor_parameters()
    before = snapshot(actor)
    stats = with_ptx(experience, 1)
    assert "ptx_loss" in stats
    assert all(not torch.equal(p, before[n]) for n, p in actor.items())
    state = backend.optimizer.state
    assert {float(state[p]["step"]) for p in actor.values()} == {UPDATES}
    assert {float(state[p]["step"]) for p in arrangement.critic_parameters().values()} == {3 * UPDATES}


def test_warmup_is_refused_under_deepspeed(rlhf_home, repo):
    overrides = ["ppo.critic_warmup_steps=2", f"launch.deepspeed={repo / 'recipes/deepspeed/zero2.json'}"]
    with pytest.raises(UserError, match="ppo.critic_warmup_steps") as caught:
        load_recipe(repo / "recipes" / "tiny-ppo-1base-1lora.yaml", overrides)
    assert "deepspeed" in str(caught.value).lower()
    load_recipe(repo / "recipes" / "tiny-ppo-1base-1lora.yaml", overrides[1:])  # no warm-up: fine

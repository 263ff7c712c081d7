"""What a PPO run reads and seeds before its first iteration: prompts, the reward model's
statistics, the KL controller, the sampling stream."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...algorithms.kl import AdaptiveKLController, FixedKLController
from ...engine.run_dir import FINAL
from ...schema import Recipe

# Not the run's seed itself: that one already drew the initial weights.
SAMPLING_SEED_OFFSET = 1


def reward_stats(recipe: Recipe) -> dict | None:
    """The RM's stored reward mean/std (`reward_stats.json`), or None."""
    if not recipe.ppo.reward_model:
        return None
    for candidate in (Path(recipe.ppo.reward_model) / FINAL, Path(recipe.ppo.reward_model)):
        if (candidate / "reward_stats.json").is_file():
            return json.loads((candidate / "reward_stats.json").read_text())
    return None


def kl_controller(ppo):
    if ppo.adaptive_kl:
        return AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    return FixedKLController(ppo.kl_coef)


def seed_sampling_stream(seed: int, rank: int) -> None:
    """Seed the random stream the rollouts are sampled from, once the models are built.

    Building draws from the global generator as much as the arrangement and the reward
    source need (fresh LoRA weights, a critic's head), so seeding after it makes one seed
    sample the same rollouts whatever was built. Each process gets a stream of its own:
    identical streams would sample correlated rollouts on every rank. A checkpoint keeps
    each rank's state (rng-rank{N}.pt), restored after this on --resume.
    """
    torch.manual_seed(seed + SAMPLING_SEED_OFFSET + 1_000_003 * rank)

"""What a PPO run reads and seeds before its first iteration: prompts, the reward model's
statistics, the KL controller, the sampling stream."""

from __future__ import annotations

import json
from pathlib import Path

from ...algorithms.kl import AdaptiveKLController, FixedKLController
from ...engine.run_dir import FINAL
from ...schema import Recipe


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

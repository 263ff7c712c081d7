"""In-process PPO on the built-in tiny model, for the arrangement tests: the recipe, a rollout,
the reference computed another way, the RM's own scores, which parameters train, and the
slice of the engine's Backend that PPO's update runs on in one process.

The reward model these take is conftest.py's `rm_run` fixture.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from cli_helpers import REPO

from rlhf_cli.config import load_recipe
from rlhf_cli.data.prompt_data import build_prompt_dataset
from rlhf_cli.data.sources import load_source
from rlhf_cli.engine.rollout import sample
from rlhf_cli.models.heads import hidden_states, response_states, token_logprobs_and_entropy
from rlhf_cli.models.loading import load_causal_lm
from rlhf_cli.stages.ppo.experience import make_experience, with_advantages
from rlhf_cli.stages.ppo.update import PPOUpdate

RECIPE = REPO / "recipes" / "tiny-ppo-1base-1lora.yaml"
ARRANGEMENTS = ("1base-1lora", "1base-2lora", "2base-2lora", "separate")
# Where the trainable parameters live: (actor prefix, critic prefixes).
TRAINABLE = {
    "1base-1lora": {"actor/default", "value_head"},
    "1base-2lora": {"actor/default", "actor/critic", "value_head"},
    "2base-2lora": {"actor/default", "rm_body/critic", "value_head"},
    "separate": {"actor/default", "critic/default", "value_head"},
}


def ppo_recipe(arrangement: str, rm_run: Path | None, *extra: str):
    reward = (["ppo.reward_fn=null", f"ppo.reward_model={rm_run}"] if rm_run is not None else [])
    return load_recipe(RECIPE, [f"ppo.arrangement={arrangement}", "ppo.rollout_batch_size=8",
                                "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "train.lr=1e-2",
                                *reward, *extra])


def rollout_of(arrangement, recipe, tokenizer, n: int = 8, seed: int = 0):
    rows = load_source(recipe.data.train, "prompts")[:n]
    examples, _ = build_prompt_dataset(rows, tokenizer, recipe.data.template, 36, "builtin:sort")
    torch.manual_seed(seed)
    return sample(arrangement, examples, tokenizer, recipe.ppo, torch.device("cpu"))


def experience_of(arrangement, ro, scores, recipe, backend, kl_coef: float = 0.05):
    """The run's two steps after scoring: the experience, then its advantages."""
    experience = make_experience(arrangement, ro, scores, recipe.ppo, None)
    return with_advantages(experience, recipe.ppo, kl_coef, backend)


def update_once(arrangement, experience, recipe, backend, scheduler, index: int = 0, vf_coef: float = 1.0):
    """Iteration `index`'s updates (run seed 0: it shuffles with seed `index`)."""
    return PPOUpdate(arrangement, recipe.ppo, backend, scheduler, vf_coef=vf_coef,
                     critic_apart=arrangement.critic_apart)(experience, index)


def base_logprobs(recipe, ro) -> torch.Tensor:
    base = load_causal_lm(recipe.model).eval().requires_grad_(False)  # frozen, as the reference is
    with torch.no_grad():
        states = response_states(hidden_states(base, ro.input_ids, ro.attention_mask), ro.prompt_width)
        return token_logprobs_and_entropy(base, states, ro.tokens, recipe.ppo.temperature, False)[0]


def rm_own_scores(rm_run: Path, input_ids, attention_mask) -> torch.Tensor:
    """The RM scored as `rlhf eval` loads and scores it (peft on a sequence classifier)."""
    from rlhf_cli.stages.evaluate.loaded import load_for_eval

    return load_for_eval(str(rm_run)).rewards(input_ids, attention_mask)


def trainable_groups(arrangement) -> set[str]:
    return name_groups(name for name, param in arrangement.named_parameters() if param.requires_grad)


def name_groups(names) -> set[str]:
    """`part/adapter` (`actor/default`) of each LoRA weight's name, `part` of the others'."""
    groups = set()
    for name in names:
        adapter = f"/{name.split('.lora_')[1].split('.')[1]}" if ".lora_" in name else ""
        groups.add(name.split(".")[0] + adapter)
    return groups


def flags(module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in module.named_parameters()}


class OneProcess:
    """The slice of the engine's Backend that PPO's update uses, for one process."""

    world_size, rank, is_main, device = 1, 0, True, torch.device("cpu")
    can_skip_steps, skipped_step = True, False

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def autocast(self):
        return contextlib.nullcontext()

    def accumulating(self, more_to_come: bool, partial: bool = False):
        return contextlib.nullcontext()

    def backward(self, loss, last_pass: bool = True):
        loss.backward()

    def optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        self.skipped_step = not math.isfinite(norm)
        if not self.skipped_step:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, value):
        return value

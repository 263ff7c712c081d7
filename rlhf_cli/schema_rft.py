"""The recipe's `rft` section: rejection-sampling fine-tuning (RFT) and RAFT, `rlhf rft`.

Each round samples `samples_per_prompt` responses for `prompts_per_round` prompts from the
current policy, scores them with the judge, keeps some by `select` and fine-tunes on the kept
ones with the SFT loss (`train.*` as `rlhf sft` reads them: `train.max_steps` optimizer steps
per round, or else `train.epochs` over the round's kept samples). One round is Llama 2's
rejection sampling / RFT; more rounds are RAFT, each sampling from the policy the last trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .algorithms.selection import top_count
from .schema_fields import Problems, above, at_least, choice, function_ref, local_path

# `recipe` below is schema.Recipe, not imported: schema.py imports this module, and an import
# back, even under TYPE_CHECKING, is a circle to tests/test_structure.py.
Recipe = Any

# best: per prompt, its highest-scored sample (RAFT "local"); top_fraction: the best
# `rft.top_fraction` of all the round's samples (RAFT "top"); threshold: every sample scored at
# or above `rft.threshold`, each distinct (prompt, response) once (RFT with a verifier).
RFT_SELECT = ("best", "top_fraction", "threshold")


@dataclass
class RFTSection:
    rounds: int = at_least(1, 1)
    samples_per_prompt: int = at_least(4, 1)
    prompts_per_round: int = at_least(64, 1)
    select: str = choice("best", RFT_SELECT)
    top_fraction: float = above(0.2, 0)  # and at most 1; RAFT's code keeps 0.2
    threshold: float | None = None
    reward_model: str | None = local_path()
    reward_fn: str | None = function_ref()
    # Sampling; RAFT samples at temperature 0.85 with top-k off.
    temperature: float = above(0.85, 0)
    top_p: float = 1.0
    top_k: int = at_least(0, 0)
    max_new_tokens: int = at_least(64, 1)
    sample_batch_size: int = at_least(64, 1)  # responses per generate call

    def kept_per_round(self) -> int | None:
        """How many samples a round keeps, where `select` fixes it (None for threshold)."""
        if self.select == "best":
            return self.prompts_per_round
        if self.select == "top_fraction":
            return top_count(self.prompts_per_round * self.samples_per_prompt, self.top_fraction)
        return None

    def problems(self, recipe: Recipe) -> Problems:
        if recipe.stage != "rft":
            return
        if not (self.reward_model or self.reward_fn):
            yield "rft", "rejection sampling needs a judge: set `rft.reward_model` or `rft.reward_fn`"
        if self.reward_model and self.reward_fn:
            yield "rft.reward_model", "give one judge: `rft.reward_model` or `rft.reward_fn`, not both"
        if self.top_fraction > 1:
            yield "rft.top_fraction", f"must be at most 1, got {self.top_fraction}"
        if self.select == "threshold" and self.threshold is None:
            yield "rft.threshold", ("select: threshold keeps every sample scored at or above it: "
                                    "set `rft.threshold`")
        if self.select != "threshold" and self.threshold is not None:
            yield "rft.threshold", f"only select: threshold reads it (select is {self.select})"
        yield from self._round_size_problems(recipe)
        processes = recipe.launch.num_processes * recipe.launch.num_machines
        if self.prompts_per_round % processes:
            # Equal shares: every rank makes the same number of generate calls (ZeRO-3 needs it).
            yield ("rft.prompts_per_round", f"each of the {processes} processes samples an equal share: "
                   f"make it a multiple of {processes}, got {self.prompts_per_round}")

    def _round_size_problems(self, recipe: Recipe) -> Problems:
        """Each round's SFT steps must be known before it starts (the schedule spans them all)."""
        train = recipe.train
        kept = self.kept_per_round()
        if kept is None and train.max_steps is None:
            yield ("train.max_steps", "select: threshold keeps a different number of samples each round: "
                   "set train.max_steps (SFT steps per round)")
        launch = recipe.launch
        global_batch = train.batch_size * train.grad_accum * launch.num_processes * launch.num_machines
        if kept is not None and train.max_steps is None and kept < global_batch:
            yield ("train.batch_size", f"a round keeps {kept} samples, fewer than one batch "
                   f"({global_batch}): lower train.batch_size or set train.max_steps")


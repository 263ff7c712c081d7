"""Generation-based evaluation: answer held-out prompts, score them with a reward function.

Used by every stage when `train.eval_reward_fn` is set (the built-in task names its own),
so a run shows its task score moving, not just its loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.hh import is_verbatim, transcript_prompt
from ..data.prompt_data import to_prompt
from ..data.prompts import prompt_ids_for_generation
from ..data.sources import load_source
from ..data.templates import get_template
from ..rewards import load_reward_fn
from ..schema import Recipe
from .sampling import generate


def prompt_text(conversation: list[dict]) -> str:
    """What the reward function sees as the prompt: the last user message's text (an HH
    transcript under `plain`: its dialogue, as PPO's reward function sees it)."""
    if is_verbatim(conversation):
        return transcript_prompt(conversation)
    users = [m for m in conversation if m["role"] != "assistant"]
    return users[-1]["content"] if users else ""


def make_task_scorer(recipe: Recipe, tokenizer, backend) -> Callable[[torch.nn.Module], dict]:
    train, data = recipe.train, recipe.data
    reward_fn = load_reward_fn(train.eval_reward_fn, key="train.eval_reward_fn")
    rows = load_source(data.eval, "prompts", key="data.eval")
    conversations = []
    keep_text = get_template(data.template).keeps_text  # as the training prompts are read
    for index, row in enumerate(rows):
        conversation = to_prompt(row, f"{data.eval}: row {index + 1}", keep_text)
        if isinstance(conversation, list):  # rows without a usable prompt are skipped
            conversations.append(conversation)
        if len(conversations) == train.eval_num_prompts:
            break
    prompts = [prompt_text(c) for c in conversations]
    prompt_ids = [prompt_ids_for_generation(c, tokenizer, data.template, data.max_prompt_length)
                  for c in conversations]
    batch = train.eval_batch_size or max(train.batch_size, 16)

    def score(lm: torch.nn.Module) -> dict:
        mine = list(range(backend.rank, len(prompts), backend.world_size))
        total, solved = 0.0, 0.0
        # Every rank runs the same number of generate calls (ZeRO-3 gathers collectively).
        rounds = -(-len(prompts) // (batch * backend.world_size))
        for r in range(rounds):
            chunk = mine[r * batch:(r + 1) * batch]
            ids = [prompt_ids[i] for i in chunk] or [prompt_ids[0]]
            out = generate(lm, ids, tokenizer, train.eval_max_new_tokens,
                           synced=backend.world_size > 1)
            if not chunk:
                continue
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            scores = reward_fn([prompts[i] for i in chunk], texts)
            total += sum(scores)
            solved += sum(s >= 1.0 for s in scores)
        sums = backend.all_reduce_sum(torch.tensor([total, solved], dtype=torch.float64,
                                                   device=backend.device)).tolist()
        return {"score": sums[0] / len(prompts), "solved": sums[1] / len(prompts)}

    return score


def policy_scorer(recipe: Recipe, tokenizer, backend) -> Callable[[torch.nn.Module], dict] | None:
    """Scorer for stage objectives that hold their policy as `.lm`; None when not asked for."""
    if not recipe.train.eval_reward_fn:
        return None
    score = make_task_scorer(recipe, tokenizer, backend)
    return lambda objective: score(objective.lm)

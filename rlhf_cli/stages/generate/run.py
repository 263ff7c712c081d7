"""One rank of `rlhf generate`: its share of the prompts not yet done, K samples each, scored
by the judge, appended to its own parts file batch by batch.

Ranks share nothing at run time (no process group): rank r of W takes every W-th prompt of
those still to do, so any number of ranks (and a different number on --resume) covers each
prompt once. Sampling is `engine.rollout.sample`, PPO's own; the judge is
`engine.judge.make_judge` (an RM trained on the policy's base rides on it as an adapter).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from types import SimpleNamespace

import torch

from ...data.loaders import load_prompts
from ...engine.judge import make_judge
from ...engine.progress import TrainingProgress
from ...engine.rollout import PlainPolicy, decode_responses, sample
from .policy import load_sampling_policy
from .settings import GenerateSettings
from .shards import RowWriter, done_indices, parts_dir, rank_file, write_total


def prompt_recipe(recipe, settings: GenerateSettings):
    """The recipe `load_prompts` reads --data with: the run's data settings, the command's
    overrides, and room for --max-new-tokens (as PPO leaves room for ppo.max_new_tokens)."""
    data = replace(recipe.data, train=settings.data, template=settings.template or recipe.data.template,
                   max_prompt_length=settings.max_prompt_length or recipe.data.max_prompt_length)
    return replace(recipe, data=data, ppo=replace(recipe.ppo, max_new_tokens=settings.max_new_tokens))


def device_of_rank() -> torch.device:
    if torch.cuda.is_available():  # more ranks than GPUs share them round-robin
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def generate_share(settings: GenerateSettings, rank: int = 0, world: int = 1) -> int:
    """Sample this rank's share; the number of prompts it did."""
    parts = parts_dir(settings.out)
    lm, tokenizer, recipe = load_sampling_policy(settings.model)
    recipe = prompt_recipe(recipe, settings)
    prompts = load_prompts(recipe, tokenizer, SimpleNamespace(is_main=rank == 0))
    texts = [prompts[i]["prompt"] for i in range(len(prompts))]
    if rank == 0:
        write_total(parts, len(prompts))
    done = done_indices(parts, texts)
    mine = [i for i in range(len(prompts)) if i not in done][rank::world]
    judge = make_judge(settings.reward_fn, settings.reward_model, key_prefix="--",
                       model_section=recipe.model, tokenizer=tokenizer, policy=lm)
    lm.to(device_of_rank())
    progress = TrainingProgress(len(mine), 0, enabled=rank == 0, title="generate")
    writer = RowWriter(rank_file(parts, rank))
    try:
        _sample_all(mine, prompts, lm, tokenizer, judge, settings, writer, progress)
    finally:
        writer.close()
        progress.close()
    return len(mine)


def _sample_all(mine, prompts, lm, tokenizer, judge, settings, writer, progress) -> None:
    started, responses, tokens = time.perf_counter(), 0, 0
    for start in range(0, len(mine), settings.batch_size):
        batch = mine[start:start + settings.batch_size]
        rows, generated = sample_rows(batch, prompts, lm, tokenizer, judge, settings)
        writer.append(rows)
        responses, tokens = responses + len(batch) * settings.n, tokens + generated
        seconds = max(time.perf_counter() - started, 1e-9)
        progress.update(start + len(batch), {"responses/s": responses / seconds,
                                             "tokens/s": tokens / seconds})
    if mine:
        seconds = max(time.perf_counter() - started, 1e-9)
        progress.log_line(f"generate: {len(mine)} prompts, {responses} responses, "
                          f"{responses / seconds:.1f} responses/s, {tokens / seconds:.0f} tokens/s")


def sample_rows(batch: list[int], prompts, lm, tokenizer, judge, settings: GenerateSettings
                ) -> tuple[list[dict], int]:
    """One row per prompt of `batch` (indices): its K responses and, with a judge, their
    scores; and the number of response tokens generated (EOS included).

    Seeded by the batch's first prompt index, so a batch samples the same whatever ran before.
    """
    torch.manual_seed(settings.seed + batch[0])
    examples = [prompts[i] for i in batch for _ in range(settings.n)]
    rollout = sample(PlainPolicy(lm), examples, tokenizer, settings, next(lm.parameters()).device)
    responses = decode_responses(rollout, tokenizer)
    scores = judge(rollout, responses).tolist() if judge is not None else None
    n = settings.n
    rows = []
    for j, index in enumerate(batch):
        row = {"index": index, "prompt": examples[j * n]["prompt"], "responses": responses[j * n:(j + 1) * n]}
        if scores is not None:
            row["scores"] = scores[j * n:(j + 1) * n]
        rows.append(row)
    return rows, int(rollout.response_mask.sum())

"""Generation-based evaluation: sample from the policy and its reference, score both.

Reported: mean reward of each, win rate of the policy against the reference (ties
count half), and KL to the reference = mean over prompts of Σ_t [log π − log π_ref] on
the policy's own samples (a k1 estimate of KL(π‖π_ref) per response). Sampling is seeded
(`settings.seed`), so a report can be reproduced.
"""

from __future__ import annotations

import contextlib

import torch

from ...data.collate import pad_batch
from ...engine.sampling import generate
from ...errors import UserError
from ...rewards import load_reward_fn


def prompt_ids_of(example: dict) -> list[int]:
    """BOS + prompt + marker: the chosen row up to its first trained token."""
    labels = example["chosen_labels"]
    first = next(i for i, label in enumerate(labels) if label != -100)
    return example["chosen_input_ids"][:first]


def _sample(loaded, prompts: list[list[int]], settings, reference: bool) -> list[list[int]]:
    model = loaded.reference if reference and loaded.reference is not None else loaded.model
    disable = (loaded.model.disable_adapter() if reference and loaded.reference is None
               else contextlib.nullcontext())
    greedy = settings.temperature == 0
    out = []
    with disable:
        for start in range(0, len(prompts), settings.batch_size):
            out += generate(model, prompts[start:start + settings.batch_size], loaded.tokenizer,
                            settings.max_new_tokens, do_sample=not greedy,
                            temperature=settings.temperature if not greedy else 1.0)
    return out


def _sequences(prompts, responses, eos_id: int, max_new_tokens: int) -> list[dict]:
    """Prompt + response, + EOS where the model stopped by itself: a response cut at
    max_new_tokens has no EOS, and one added would count a token it never sampled."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        r = r + [eos_id] if len(r) < max_new_tokens else r
        out.append({"input_ids": p + r, "labels": [-100] * len(p) + r})
    return out


@torch.no_grad()
def _kl(loaded, sequences: list[dict], batch_size: int) -> list[float]:
    values = []
    for start in range(0, len(sequences), batch_size):
        batch = pad_batch(sequences[start:start + batch_size], loaded.tokenizer.pad_token_id)
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        values += (loaded.logps(*args) - loaded.logps(*args, reference=True)).tolist()
    return values


def make_scorer(loaded, reward_model: str | None, reward_fn: str | None):
    """The judge: `score(prompt texts, token sequences, response texts) -> rewards`.

    Built before anything is scored, so that a wrong judge fails fast."""
    if reward_fn:
        fn = load_reward_fn(reward_fn, key="--reward-fn")
        return lambda texts, sequences, responses: fn(texts, responses)
    if not reward_model:
        raise UserError("--generate needs --reward-model or --reward-fn to score the answers")
    from .loaded import load_for_eval

    judge = load_for_eval(reward_model)
    if judge.kind != "reward_model":
        raise UserError(f"{reward_model} is not a reward model", where="--reward-model")
    if judge.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise UserError("the reward model must share the policy's tokenizer", where="--reward-model")

    def score(texts, sequences, responses):
        batch = pad_batch(sequences, judge.tokenizer.pad_token_id)
        return judge.rewards(batch["input_ids"], batch["attention_mask"]).tolist()

    return score


def generation_report(loaded, examples: list[dict], settings, score) -> dict:
    """Sample from the policy and its reference for the first prompts; judge both with `score`."""
    chosen = examples[: settings.num_prompts]
    prompts = [prompt_ids_of(e) for e in chosen]
    texts = [e.get("prompt", "") for e in chosen]
    eos = loaded.tokenizer.eos_token_id
    results = {}
    for name, reference in (("policy", False), ("reference", True)):
        torch.manual_seed(settings.seed)
        responses = _sample(loaded, prompts, settings, reference)
        decoded = loaded.tokenizer.batch_decode(responses, skip_special_tokens=True)
        sequences = _sequences(prompts, responses, eos, settings.max_new_tokens)
        results[name] = (score(texts, sequences, decoded), sequences, decoded)
    policy_scores, policy_sequences, samples = results["policy"]
    reference_scores = results["reference"][0]
    wins = [1.0 if p > r else 0.5 if p == r else 0.0
            for p, r in zip(policy_scores, reference_scores, strict=True)]
    kl = _kl(loaded, policy_sequences, settings.batch_size)
    return {
        "num_prompts": len(prompts),
        "mean_reward": sum(policy_scores) / len(prompts),
        "reference_mean_reward": sum(reference_scores) / len(prompts),
        "win_rate": sum(wins) / len(prompts),
        "kl": sum(kl) / len(kl),
        "samples": [{"prompt": t, "response": s} for t, s in zip(texts[:5], samples[:5], strict=True)],
    }

"""Generation-based evaluation: sample from the policy and its reference, score both.

Reported: mean reward of each, win rate of the policy against the reference (ties
count half), and `kl`: along each of the policy's responses, the exact KL between the two
next-token distributions at every sampled token, summed over the vocabulary, summed over the
response (its EOS included), then the mean over responses. The distributions are the ones
sampled from, π/T and π_ref/T (log-probs from models/, so every family's logit transform
applies); at temperature 0 (greedy) they are the T = 1 distributions along the greedy
responses. `kl_definition` says this in the report. Sampling is seeded (`settings.seed`), so
a report can be reproduced.
"""

from __future__ import annotations

import torch

from ...algorithms.kl import exact_kl
from ...data.collate import pad_batch
from ...engine.sampling import generate
from ...errors import UserError
from ...models.lm_forward import shifted_targets
from ...rewards import load_reward_fn


def prompt_ids_of(example: dict) -> list[int]:
    """BOS + prompt + marker: the chosen row up to its first trained token."""
    labels = example["chosen_labels"]
    first = next(i for i, label in enumerate(labels) if label != -100)
    return example["chosen_input_ids"][:first]


def _sample(loaded, prompts: list[list[int]], settings, reference: bool) -> list[list[int]]:
    greedy = settings.temperature == 0
    out = []
    with loaded.scored(reference) as model:
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


def kl_temperature(temperature: float) -> float:
    """The temperature of the distributions the KL compares: the sampling one; T = 1 for greedy."""
    return temperature if temperature > 0 else 1.0


def kl_definition(temperature: float) -> str:
    along = "greedy responses (T=0): the T=1 distributions" if temperature == 0 else (
        f"sampled responses: the distributions sampled from, at T={temperature:g}")
    return ("mean over the policy's responses of the sum over their tokens (EOS included) of the "
            "exact KL(policy || reference) of the next-token distributions, summed over the "
            f"vocabulary; along the {along}")


@torch.no_grad()
def response_kl(loaded, sequences: list[dict], batch_size: int, temperature: float) -> list[float]:
    """Per sequence: Σ over its labelled tokens of KL(π_T(·|ctx) ‖ π_ref,T(·|ctx)), exact."""
    values = []
    for start in range(0, len(sequences), batch_size):
        batch = pad_batch(sequences[start:start + batch_size], loaded.tokenizer.pad_token_id)
        _, mask = shifted_targets(batch["input_ids"], batch["labels"])
        args = (batch["input_ids"], batch["attention_mask"], mask)
        per_token = exact_kl(loaded.logits_at(*args), loaded.logits_at(*args, reference=True), temperature)
        rows = mask.nonzero()[:, 0].to(per_token.device)
        values += torch.zeros(mask.shape[0], device=per_token.device).index_add(0, rows, per_token).tolist()
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
    kl = response_kl(loaded, policy_sequences, settings.batch_size, kl_temperature(settings.temperature))
    return {
        "num_prompts": len(prompts),
        "mean_reward": sum(policy_scores) / len(prompts),
        "reference_mean_reward": sum(reference_scores) / len(prompts),
        "win_rate": sum(wins) / len(prompts),
        "kl": sum(kl) / len(kl),
        "kl_definition": kl_definition(settings.temperature),
        "samples": [{"prompt": t, "response": s} for t, s in zip(texts[:5], samples[:5], strict=True)],
    }

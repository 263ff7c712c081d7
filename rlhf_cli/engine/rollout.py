"""Rollouts: sample responses with the KV cache, then lay out prompt | response tensors.

The one sampling path of every stage that learns from its own samples (PPO, and the
sampling stages: generate, rft, online DPO). `sample` reads a policy as "what generates,
under which context": a PPO arrangement, or any causal LM wrapped in `PlainPolicy`.

Prompts are left-padded to width P, responses right-padded to width R. Everything after
a response's first EOS is masked; the EOS itself is part of the response.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..data.collate import pad_prompts
from ..models.zero3 import weights_gathered_once

# Not the run's seed itself: that one already drew the initial weights.
SAMPLING_SEED_OFFSET = 1


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] float: 1 on response tokens (EOS included)
    tokens: torch.Tensor  # [B, R] the response tokens (pad after the end)
    prompt_width: int
    ended: torch.Tensor  # [B] bool: the response has an EOS
    prompts: list[str]


class PlainPolicy:
    """A causal LM (plain or peft) as `sample` reads a policy."""

    def __init__(self, lm):
        self.lm = lm

    def generation_model(self):
        return self.lm

    def generation_context(self):
        return contextlib.nullcontext()


def response_mask_of(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, R] that covers each row up to and including its first EOS; and `ended` [B]."""
    is_eos = tokens == eos_id
    ended = is_eos.any(dim=1)
    # Positions strictly after the first EOS: a cumulative count of EOS seen before them.
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after).float(), ended


def sampling_settings(ppo) -> dict:
    """generate() settings that sample from exactly the distribution the log-probs use.

    `ppo`: anything with temperature, top_p, top_k and max_new_tokens (the PPO section, or
    a sampling stage's own settings).

    Every value is explicit: a setting left out falls back to the model's
    generation_config.json (LLaMA 2 ships temperature 0.6 and top_p 0.9) or to transformers'
    top_k = 50, and the rollout would no longer come from π/T.
    """
    return {"do_sample": True, "temperature": ppo.temperature, "top_p": ppo.top_p,
            "top_k": ppo.top_k, "repetition_penalty": 1.0, "typical_p": 1.0,
            "max_new_tokens": ppo.max_new_tokens, "use_cache": True}


@torch.no_grad()
def sample(arrangement, examples: list[dict], tokenizer, ppo, device, synced: bool = False) -> Rollout:
    """`synced`: several ranks under ZeRO-3 must keep stepping until all are done."""
    batch = pad_prompts(examples, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    model = arrangement.generation_model()
    was_training = model.training
    model.eval()  # dropout off: noisy rollouts make rewards, values and old log-probs noisy
    try:
        with arrangement.generation_context(), weights_gathered_once(model):
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced, **sampling_settings(ppo))
    finally:
        model.train(was_training)
    width = prompt_ids.shape[1]
    tokens = out[:, width:]
    response_mask, ended = response_mask_of(tokens, tokenizer.eos_token_id)
    tokens = torch.where(response_mask.bool(), tokens, torch.full_like(tokens, tokenizer.pad_token_id))
    attention = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Rollout(torch.cat([prompt_ids, tokens], dim=1), attention, response_mask, tokens, width,
                   ended, [e["prompt"] for e in examples])


def decode_responses(rollout: Rollout, tokenizer) -> list[str]:
    rows = [t[m.bool()].tolist() for t, m in zip(rollout.tokens, rollout.response_mask, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def seed_sampling_stream(seed: int, rank: int) -> None:
    """Seed the random stream the rollouts are sampled from, once the models are built.

    Building draws from the global generator as much as the arrangement and the reward
    source need (fresh LoRA weights, a critic's head), so seeding after it makes one seed
    sample the same rollouts whatever was built. Each process gets a stream of its own:
    identical streams would sample correlated rollouts on every rank. A checkpoint keeps
    each rank's state (rng-rank{N}.pt), restored after this on --resume.
    """
    torch.manual_seed(seed + SAMPLING_SEED_OFFSET + 1_000_003 * rank)

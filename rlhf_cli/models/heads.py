"""Per-position pieces shared by every arrangement: log-probs, entropy, values, rewards.

Sequences are [prompt left-padded to width P | response right-padded to width R]. The
state that predicts response token t sits at column P − 1 + t, so only those R columns go
through the output head (and the value head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..algorithms.ppo import entropy_from_logits
from .checkpointed_head import checkpointed_logprobs_and_entropy
from .decoder import decoder_states, inner_causal_lm
from .lm_forward import frozen_head, frozen_head_logprobs, selected_logits, shifted_targets
from .logits import require_head
from .reward import last_token_scores

STAGE = "ppo"


def hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    return decoder_states(model, input_ids, attention_mask, stage=STAGE)


def response_states(hidden: torch.Tensor, prompt_width: int) -> torch.Tensor:
    return hidden[:, prompt_width - 1:-1]


def token_logprobs_and_entropy(model, states, tokens, temperature: float, with_entropy: bool,
                               entropy_grad: bool = False):
    """log π(token) [B, R] (and entropy [B, R], a statistic) from the states that predict `tokens`,
    equal to log_softmax(model(...).logits / T): the head, then the family's logit transform.
    With `entropy_grad` (PPO-max's entropy bonus) the entropy takes a gradient too.

    A frozen head (LoRA) goes chunk by chunk and never holds the [B, R, V] logits
    (models/lm_forward.py; with the entropy's gradient, models/checkpointed_head.py); a
    trainable or ZeRO-3-partitioned head takes autograd's path, which holds them.
    A model whose logits are not its head's (models/logits.py) is an error: these states also
    feed the value head, so there is no full-forward fallback here.
    """
    transform = require_head(model, STAGE).transform
    head = inner_causal_lm(model).get_output_embeddings()
    if frozen_head(head) and with_entropy and entropy_grad:
        logp, entropy = checkpointed_logprobs_and_entropy(states.flatten(0, 1), head, tokens.flatten(),
                                                          temperature, transform)
        return logp.view(tokens.shape), entropy.view(tokens.shape)
    if frozen_head(head):
        logp, entropy = frozen_head_logprobs(states.flatten(0, 1), head, tokens.flatten(), temperature,
                                             with_entropy, transform)
        return logp.view(tokens.shape), (entropy.view(tokens.shape) if with_entropy else None)
    logits = transform(head(states)) / temperature
    logp = -F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    logp = logp.view(tokens.shape)
    entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) if with_entropy else None
    return logp, entropy


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Token-mean next-token cross-entropy on the labelled tokens of an SFT batch (the SFT
    loss of `rlhf sft`, at temperature 1), for PPO-ptx."""
    targets, mask = shifted_targets(batch["input_ids"], batch["labels"])
    logits = selected_logits(model, batch["input_ids"], batch["attention_mask"], mask)
    return F.cross_entropy(logits.float(), targets[mask])


def sequence_reward(model, head: torch.nn.Linear, input_ids, attention_mask) -> torch.Tensor:
    """Scalar reward per row from `head` at the last real token (the EOS), computed as
    `rlhf_cli.models.reward.score_sequences` computes an RM's own score."""
    return last_token_scores(head, hidden_states(model, input_ids, attention_mask), attention_mask)


def linear_head_from(weight: torch.Tensor, trainable: bool, dtype=torch.float32) -> torch.nn.Linear:
    """A bias-free [H -> 1] head holding a copy of `weight` (a clone, never a view).

    Float32 for both: a trainable value head, and a reward head, whose RM scores with a float32
    head on any body (models/reward.py), so that the reward equals the RM's own score.
    """
    head = torch.nn.Linear(weight.shape[1], 1, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight.detach().clone().to(dtype))
    return head.requires_grad_(trainable)


def zero_head(hidden_size: int) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden_size, 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    return head

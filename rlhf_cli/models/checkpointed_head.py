"""Log-probs and entropy that both take a gradient, without holding the [N, V] logits.

PPO-max's entropy bonus (`ppo.entropy_coef > 0`) needs d H / d hidden, which the frozen-head
path of lm_forward.py (`FrozenHeadLogprobs`: the entropy a statistic) does not give. Through
autograd directly, the head's logits, their log-softmax and the softmax stay alive from the
forward to the backward: several [N, V] float32 tensors. Here each chunk of rows runs under
`torch.utils.checkpoint`: the forward keeps only the chunk's input (a view of the states,
alive anyway), and the backward recomputes one chunk at a time, so at most one chunk's
[rows, V] tensors live at once. Same ops as the direct path, so the same values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..algorithms.ppo import entropy_from_logits
from .lm_forward import CHUNK_BYTES


def _chunk_logprobs_and_entropy(states, targets, head, transform, temperature: float):
    logits = transform(head(states)) / temperature
    return -F.cross_entropy(logits, targets, reduction="none"), entropy_from_logits(logits)


def checkpointed_logprobs_and_entropy(states, head, targets, temperature: float, transform,
                                      chunk_bytes: int = CHUNK_BYTES):
    """(log p(target) [N], entropy [N]) of the rows of `states` [N, H] under `head` and then the
    family's logit `transform`, at `temperature`; both differentiable, `chunk_bytes` of float32
    logits at a time."""
    rows = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    parts = [checkpoint(_chunk_logprobs_and_entropy, states[start:start + rows], targets[start:start + rows],
                        head, transform, temperature, use_reentrant=False)
             for start in range(0, states.shape[0], rows)]
    return torch.cat([logp for logp, _ in parts]), torch.cat([entropy for _, entropy in parts])

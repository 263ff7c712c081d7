"""The entropy bonus's chunked path (models/checkpointed_head.py): the same log-probs, entropy
and gradients as autograd's direct path over the full logits, while keeping none of the
[N, V] logits between forward and backward (each chunk is recomputed in backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli.algorithms.ppo import entropy_from_logits
from rlhf_cli.models.checkpointed_head import checkpointed_logprobs_and_entropy
from rlhf_cli.models.logits import LogitTransform

N, H, V, TEMPERATURE = 45, 16, 300, 0.7


def direct(states, head, targets, transform):
    logits = transform(head(states)) / TEMPERATURE
    return -F.cross_entropy(logits, targets, reduction="none"), entropy_from_logits(logits)


def saved_bytes(fn) -> tuple[int, tuple]:
    """Bytes of every tensor autograd keeps for the backward while `fn` runs, and fn's output."""
    seen = []

    def pack(tensor):
        seen.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return sum(seen), out


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=3.0)])
def test_chunked_gradients_equal_the_direct_computation(transform):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    states = torch.randn(N, H, dtype=torch.float64).float().requires_grad_(True)
    targets = torch.randint(0, V, (N,))
    weights = torch.randn(2, N)
    grads, values = [], []
    for chunk_bytes in (None, 4 * V * 8):  # direct; chunks of 8 rows (6 chunks, the last one short)
        states.grad = None
        logp, entropy = (direct(states, head, targets, transform) if chunk_bytes is None else
                         checkpointed_logprobs_and_entropy(states, head, targets, TEMPERATURE, transform,
                                                           chunk_bytes=chunk_bytes))
        ((weights[0] * logp).sum() + (weights[1] * entropy).sum()).backward()
        grads.append(states.grad.clone())
        values.append((logp.detach(), entropy.detach()))
    assert grads[0].abs().max() > 1e-2
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)
    for got, want in zip(values[1], values[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_chunks_keep_no_logits_for_the_backward():
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    states = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    transform = LogitTransform()
    kept_direct, _ = saved_bytes(lambda: direct(states, head, targets, transform))
    kept_chunked, out = saved_bytes(lambda: checkpointed_logprobs_and_entropy(
        states, head, targets, TEMPERATURE, transform, chunk_bytes=4 * V * 8))
    logits_bytes = 4 * N * V
    print(f"kept for backward: direct {kept_direct} B, chunked {kept_chunked} B, logits {logits_bytes} B")
    assert kept_direct >= 2 * logits_bytes  # at least the log-softmax and the softmax
    assert kept_chunked < logits_bytes / 10  # no [N, V] tensor, only the chunks' inputs
    sum(out).sum().backward()  # and the recomputation gives a gradient
    assert states.grad.abs().max() > 0

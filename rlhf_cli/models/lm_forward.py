"""Token log-probs of selected positions without materialising the full logits tensor.

A causal LM's head turns every position's hidden state into a vocabulary-sized row; for
SFT with prompt masking and for DPO only response tokens matter. We run the decoder
through the wrapper's forward (so DDP/DeepSpeed see it) and apply the output head only
to the positions that carry loss: with a 32k vocabulary this saves most of the logits
memory and compute. With a frozen head (LoRA) the log-probs go through it chunk by chunk
(`FrozenHeadLogprobs`), so even those positions' logits are never held all at once.
Head outputs then go through the family's final transform (soft-cap, scale); models/logits.py
checks once per model that this equals `model(...).logits`, and a model it does not is run
through its full forward instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoder import decoder_of, decoder_states, inner_causal_lm, position_ids_from
from .logits import IDENTITY, LogitTransform, head_path

__all__ = ["decoder_of", "decoder_states", "inner_causal_lm", "position_ids_from"]  # re-exported


def shifted_targets(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1. Returns (targets, mask), both [B, T-1]."""
    targets = labels[:, 1:]
    return targets, targets != -100


def selected_logits(model, input_ids, attention_mask, mask) -> torch.Tensor:
    """Logits [N, V] (float32) of the positions where `mask` ([B, T-1]) is true, in order:
    exactly `model(...).logits` there (models/logits.py checks the fast path per model)."""
    verdict = head_path(model)
    if verdict.exact:
        hidden = decoder_states(model, input_ids, attention_mask)
        return verdict.transform(inner_causal_lm(model).get_output_embeddings()(hidden[:, :-1][mask]))
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from(attention_mask), use_cache=False).logits
    return logits[:, :-1][mask].float()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """log p(target) per row of `logits` [N, V]; float32 for a stable log-softmax."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


# Rows of logits per chunk in `FrozenHeadLogprobs`: 64 MiB of fp32 logits at a time.
CHUNK_BYTES = 64 * 2**20


class FrozenHeadLogprobs(torch.autograd.Function):
    """log p(target) of each row of `hidden` [N, H] under a frozen output head followed by the
    family's logit transform, chunk by chunk; with `with_entropy`, also each row's entropy (a
    statistic: it takes no gradient).

    The head is frozen under LoRA, so the only gradient it passes on is d logp / d hidden =
    Σ_j (δ_j,target − p_j) · z'(u_j) · W_j / T, with u = W·h the head's output and z' the
    transform's slope (a constant scale, or per entry 1 − tanh²(u/c) for a soft-cap): an
    [N, H] tensor that forward computes chunk by chunk and keeps, and backward scales by the
    incoming gradient. No more than a chunk of [N, V] logits is ever held (autograd would keep
    the logits, their log-softmax and their gradient, each 4·N·V bytes), with the same two
    GEMMs as autograd's forward and backward. Returns (log-probs [N], entropy [N] or empty).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool = False,
                transform: LogitTransform = IDENTITY):
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = out.new_empty(hidden.shape[0] if with_entropy else 0)
        need_grad = ctx.needs_input_grad[0]
        grads = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        for start in range(0, hidden.shape[0], rows):
            part, target = slice(start, start + rows), targets[start:start + rows]
            logits, slope = transform.with_slope(F.linear(hidden[part], weight, bias))
            if temperature != 1.0:
                logits = logits / temperature
            lse = torch.logsumexp(logits, dim=-1)
            out[part] = logits.gather(1, target[:, None]).squeeze(1) - lse
            if not (need_grad or with_entropy):
                continue
            log_probs = logits.sub_(lse[:, None])  # in the logits' memory
            probs = log_probs.exp()
            if with_entropy:  # −Σ p log p as a row-wise dot product: no third [rows, V] tensor
                entropy[part] = -(probs[:, None, :] @ log_probs[:, :, None]).view(-1)
            if need_grad:
                grads[part] = _hidden_grad(probs, slope, weight, target) / temperature
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy)
        if need_grad:
            ctx.save_for_backward(grads)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        (grads,) = ctx.saved_tensors
        return (grad_out[:, None] * grads).to(ctx.hidden_dtype), None, None, None, None, None, None


def _hidden_grad(probs, slope, weight, target) -> torch.Tensor:
    """d log p(target) / d hidden · T for one chunk: (z'_t·W_t − (p ⊙ z')·W); `probs` is consumed."""
    if isinstance(slope, torch.Tensor):  # per-entry slope (soft-cap)
        target_slope = slope.gather(1, target[:, None])
        weighted = probs.mul_(slope)
    else:
        target_slope, weighted = slope, probs.mul_(slope) if slope != 1.0 else probs
    expected = (weighted.to(weight.dtype) @ weight).float()
    return target_slope * weight[target].float() - expected


def frozen_head_logprobs(hidden, head, targets, temperature: float = 1.0, with_entropy: bool = False,
                         transform: LogitTransform = IDENTITY):
    """(log p(target) [N], entropy [N] or None) of the rows of `hidden` [N, H] under `head`
    and then `transform`."""
    logp, entropy = FrozenHeadLogprobs.apply(hidden, head.weight, head.bias, targets, temperature,
                                             with_entropy, transform)
    return logp, (entropy if with_entropy else None)


def frozen_head(head) -> bool:
    """A plain linear head whose parameters take no gradient and are not partitioned (ZeRO-3)."""
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    return (type(head) is torch.nn.Linear and not any(p.requires_grad for p in params)
            and not any(hasattr(p, "ds_id") for p in params))


def selected_logprobs(model, input_ids, attention_mask, mask, targets, temperature: float = 1.0):
    """log p(target) [N] at the positions where `mask` ([B, T-1]) is true; `targets` [N]."""
    verdict = head_path(model)
    head = inner_causal_lm(model).get_output_embeddings()
    if verdict.exact and frozen_head(head):
        hidden = decoder_states(model, input_ids, attention_mask)
        return frozen_head_logprobs(hidden[:, :-1][mask], head, targets, temperature,
                                    transform=verdict.transform)[0]
    return token_logprobs(selected_logits(model, input_ids, attention_mask, mask), targets, temperature)


def sequence_logprobs(model, input_ids, attention_mask, labels, temperature: float = 1.0):
    """Summed log-probs of the labelled tokens of each row, and how many there are.

    Returns (logps [B], counts [B]); only labelled positions go through the output head.
    """
    targets, mask = shifted_targets(input_ids, labels)
    per_token = selected_logprobs(model, input_ids, attention_mask, mask, targets[mask], temperature)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(input_ids.shape[0], dtype=per_token.dtype, device=per_token.device)
    sums = sums.index_add(0, rows, per_token)
    return sums, mask.sum(dim=1)

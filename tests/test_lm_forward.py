"""Log-probs through a frozen head, chunk by chunk, equal autograd's through the full logits."""

from __future__ import annotations

import pytest
import torch

from rlhf_cli.models import lm_forward


@pytest.fixture
def lora_lm(rlhf_home):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_cli.builtin.model import materialize

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(materialize("tiny")), dtype=torch.float32)
    # random (not zero) LoRA weights, so that every adapter matrix gets a gradient
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))


def reference_logprobs(model, ids, mask, labels, temperature):
    targets, where = lm_forward.shifted_targets(ids, labels)
    logits = lm_forward.selected_logits(model, ids, mask, where)  # the full [N, V] path
    per_token = lm_forward.token_logprobs(logits, targets[where], temperature)
    return torch.zeros(ids.shape[0]).index_add(0, where.nonzero()[:, 0], per_token)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_frozen_head_matches_autograd(lora_lm, monkeypatch, temperature):
    monkeypatch.setattr(lm_forward, "CHUNK_BYTES", 4 * 264 * 7)  # 7 rows per chunk: several chunks
    torch.manual_seed(1)
    ids = torch.randint(4, 250, (4, 30))
    mask = torch.ones_like(ids)
    mask[1, 22:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :9] = -100  # the prompt
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # what DPO's loss passes back per sequence
    trainable = [p for p in lora_lm.parameters() if p.requires_grad]
    assert not lora_lm.get_output_embeddings().weight.requires_grad  # the chunked path is taken

    fast, counts = lm_forward.sequence_logprobs(lora_lm, ids, mask, labels, temperature)
    slow = reference_logprobs(lora_lm, ids, mask, labels, temperature)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-4)
    assert counts.tolist() == [21, 13, 21, 21]
    fast_grads = torch.autograd.grad((fast * weights).sum(), trainable)
    slow_grads = torch.autograd.grad((slow * weights).sum(), trainable)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        # fp32 sums in another order: equal up to rounding, relative to the gradient's size
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-5 * float(slow_grad.abs().max()))
    with torch.no_grad():  # the reference pass: no gradient kept
        torch.testing.assert_close(lm_forward.sequence_logprobs(lora_lm, ids, mask, labels, temperature)[0],
                                   slow.detach(), rtol=1e-6, atol=1e-4)


def test_a_trainable_head_takes_the_autograd_path(lora_lm):
    head = lora_lm.get_output_embeddings()
    assert lm_forward._frozen_head(head)
    head.weight.requires_grad_(True)
    assert not lm_forward._frozen_head(head)

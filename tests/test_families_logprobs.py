"""Every log-prob path equals log_softmax(model(...).logits / T) on every family of
tests/families.py (fp32, dropout off), and `lora.target_modules: auto` adapts the right layers.

The reference is always computed here from the model's own full forward; the paths under
test are the ones the stages call (SFT loss, sequence/selected log-probs, the chunked frozen
head, PPO's log-probs and entropy, PPO-ptx, the RM's lm loss).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, TIED, build_family

from rlhf_cli.models import lm_forward
from rlhf_cli.models.loading import add_lora
from rlhf_cli.schema import LoraSection

PROMPT = 5  # columns of prompt in the test batch: labels start after it
ATOL = 1e-4
SCALED = ["gemma2", "gemma3_text", "cohere", "granite"]  # families with a final logit transform


def batch(seed: int = 0):
    """Two rows of 14 tokens, the second left-padded by 3, prompt labels masked."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (2, 14), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :PROMPT] = -100
    return ids, mask, labels


def with_lora(name: str):
    """The family with random (non-zero) LoRA weights on `auto` targets: a frozen head."""
    torch.manual_seed(0)
    model = add_lora(build_family(name), LoraSection(r=4, dropout=0.0))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.05)
    return model.eval()


def model_logprobs(model, ids, mask, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(model(...).logits / T) [B, T-1, V] from the model's own forward."""
    logits = model(input_ids=ids, attention_mask=mask,
                   position_ids=lm_forward.position_ids_from(mask), use_cache=False).logits
    return (logits[:, :-1].float() / temperature).log_softmax(-1)


def picked(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, with_lora(request.param)


def test_sequence_and_sft_paths_equal_the_models_logits(family):
    from rlhf_cli.stages.sft import SFTObjective

    name, model = family
    ids, mask, labels = batch()
    targets, where = lm_forward.shifted_targets(ids, labels)
    for temperature in (1.0, 0.7):
        reference = picked(model_logprobs(model, ids, mask, temperature), ids)
        sums = (reference * where).sum(1)
        fast, counts = lm_forward.sequence_logprobs(model, ids, mask, labels, temperature)  # chunked head
        torch.testing.assert_close(fast, sums, rtol=0, atol=ATOL, msg=f"{name} T={temperature}")
        per_token = lm_forward.token_logprobs(lm_forward.selected_logits(model, ids, mask, where),
                                             targets[where], temperature)
        torch.testing.assert_close(per_token, reference[where], rtol=0, atol=ATOL)
    assert counts.tolist() == where.sum(1).tolist()
    sft = SFTObjective(model)(ids, mask, labels)
    torch.testing.assert_close(sft, -(picked(model_logprobs(model, ids, mask), ids) * where).sum(),
                               rtol=1e-5, atol=ATOL)


def test_ppo_paths_equal_the_models_logits(family):
    from rlhf_cli.models.heads import hidden_states, lm_loss, response_states, token_logprobs_and_entropy

    name, model = family
    ids, mask, labels = batch(1)
    temperature = 0.7
    reference = model_logprobs(model, ids, mask, temperature)[:, PROMPT - 1:]  # response positions
    tokens = ids[:, PROMPT:]
    states = response_states(hidden_states(model, ids, mask), PROMPT)
    logp, entropy = token_logprobs_and_entropy(model, states, tokens, temperature, True)
    torch.testing.assert_close(logp, reference.gather(-1, tokens[..., None]).squeeze(-1),
                               rtol=0, atol=ATOL, msg=name)
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1), rtol=0, atol=ATOL)
    targets, where = lm_forward.shifted_targets(ids, labels)
    ptx = lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    torch.testing.assert_close(ptx, -picked(model_logprobs(model, ids, mask), ids)[where].mean(),
                               rtol=0, atol=ATOL)


def test_a_trainable_head_equals_the_models_logits(family):
    """Full fine-tuning: the head trains, so PPO's log-probs take autograd's path."""
    from rlhf_cli.models.heads import hidden_states, response_states, token_logprobs_and_entropy

    name, lora_model = family
    model = lora_model.get_base_model()
    ids, _, _ = batch(2)
    mask = torch.ones_like(ids)
    with lora_model.disable_adapter():
        reference = model_logprobs(model, ids, mask, 0.7)[:, PROMPT - 1:]
        model.get_output_embeddings().weight.requires_grad_(True)
        try:
            states = response_states(hidden_states(model, ids, mask), PROMPT)
            logp = token_logprobs_and_entropy(model, states, ids[:, PROMPT:], 0.7, False)[0]
        finally:
            model.get_output_embeddings().weight.requires_grad_(False)
    assert logp.requires_grad
    torch.testing.assert_close(logp, reference.gather(-1, ids[:, PROMPT:, None]).squeeze(-1),
                               rtol=0, atol=ATOL, msg=name)


def test_the_rm_lm_loss_equals_the_models_logits(family):
    """`rlhf rm` with rm.lm_loss_weight: the base's head weight applied to the body's states."""
    from rlhf_cli.stages.rm import response_nll

    name, lora_model = family
    model = lora_model.get_base_model()
    ids, mask, labels = batch(2)
    _, where = lm_forward.shifted_targets(ids, labels)
    with lora_model.disable_adapter():
        nll = response_nll(lm_forward.decoder_states(model, ids, mask), ids, labels,
                           model.get_output_embeddings().weight, model.config)
        expected = -(picked(model_logprobs(model, ids, mask), ids) * where).sum(1) / where.sum(1)
    torch.testing.assert_close(nll, expected, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("name", ["llama", *SCALED])
def test_chunked_frozen_head_gradients_equal_autograd_through_the_full_logits(name, monkeypatch):
    monkeypatch.setattr(lm_forward, "CHUNK_BYTES", 4 * 260 * 5)  # 5 rows per chunk: several chunks
    model = with_lora(name)
    ids, mask, labels = batch(3)
    targets, where = lm_forward.shifted_targets(ids, labels)
    weights = torch.tensor([1.5, -2.0])  # what DPO's loss passes back per sequence
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not model.get_output_embeddings().weight.requires_grad  # the chunked path is taken
    fast = lm_forward.sequence_logprobs(model, ids, mask, labels, 0.8)[0]
    slow = (picked(model_logprobs(model, ids, mask, 0.8), ids) * where).sum(1)
    fast_grads = torch.autograd.grad((fast * weights).sum(), trainable)
    slow_grads = torch.autograd.grad((slow * weights).sum(), trainable)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-5 * float(slow_grad.abs().max()))


def test_the_families_cover_tied_and_untied_heads_and_their_transforms_matter():
    assert {"gpt2", "gemma2", "qwen2"} <= TIED and {"llama", "granite", "phi3"} <= set(FAMILIES) - TIED
    ids, mask, _ = batch()
    for name in SCALED:  # a path that skips the transform would be off by far more than ATOL
        model = build_family(name)
        with torch.no_grad():
            head_only = model.get_output_embeddings()(lm_forward.decoder_states(model, ids, mask))
            error = (head_only[:, :-1].log_softmax(-1) - model_logprobs(model, ids, mask)).abs().max()
        assert error > 1.0, name


# Leaf names `auto` must adapt: attention (fused QKV included) and MLP (fused gate_up included).
# MoE families: the experts are 3-D parameters in transformers 5, not linear layers: `auto` gives
# them LoRA as parameters (tests/test_moe_lora.py); the linear layers it adapts are the attention's.
ATTENTION_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LORA_TARGETS = {
    **{name: ATTENTION_MLP for name in FAMILIES},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen3_moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "bloom": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "falcon": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}


def test_auto_lora_targets_attention_and_mlp_never_the_head(family):
    name, model = family
    targeted = model.targeted_module_names
    assert {n.rsplit(".", 1)[-1] for n in targeted} == LORA_TARGETS[name]
    from transformers.pytorch_utils import Conv1D

    linear = {n for n, m in build_family(name).named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    head = {n for n in linear if n.rsplit(".", 1)[-1] in ("lm_head", "embed_out")}
    assert head and set(targeted) == linear - head  # every linear layer of every block
    head = model.get_base_model().get_output_embeddings()
    assert type(head) is torch.nn.Linear  # not wrapped by a LoRA layer
    assert not any(param.requires_grad for param in head.parameters())


def test_frozen_head_transform_gradient_is_the_softcap_slope():
    """The chunked function alone, on a soft-capped and scaled head, against autograd."""
    from rlhf_cli.models.logits import LogitTransform

    torch.manual_seed(4)
    head = torch.nn.Linear(8, 40, bias=True).requires_grad_(False)
    with torch.no_grad():
        head.weight.mul_(8.0)  # logits well into the cap's curved part
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = torch.randint(0, 40, (6,))
    for transform in (LogitTransform(0.5, 2.0), LogitTransform(0.25), LogitTransform(1.0, 3.0)):
        logp, _ = lm_forward.frozen_head_logprobs(hidden, head, targets, 0.9, transform=transform)
        full = (F.linear(hidden, head.weight, head.bias) * transform.scale)
        if transform.softcap:
            full = transform.softcap * torch.tanh(full / transform.softcap)
        full = (full / 0.9).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(logp, full, rtol=1e-6, atol=1e-5)
        (grad,) = torch.autograd.grad(logp.sum(), hidden)
        (full_grad,) = torch.autograd.grad(full.sum(), hidden)
        torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", *SCALED])
def test_the_probe_in_bf16_finds_the_transform_and_rejects_a_missing_one(name, monkeypatch):
    """bf16 rounding must not hide a missing transform, nor reject a right one (PPO would refuse)."""
    from rlhf_cli.models.logits import IDENTITY, LogitTransform, head_path

    expected = LogitTransform.from_config(build_family(name).config)
    verdict = head_path(build_family(name).to(torch.bfloat16))
    assert verdict.exact and verdict.transform == expected
    if not expected.identity:  # the config proposes nothing: the head alone must not pass
        monkeypatch.setattr(LogitTransform, "from_config", classmethod(lambda cls, config: IDENTITY))
        assert not head_path(build_family(name).to(torch.bfloat16)).exact

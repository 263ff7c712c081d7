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
    assert lm_forward.frozen_head(head)
    head.weight.requires_grad_(True)
    assert not lm_forward.frozen_head(head)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_and_logprobs_equal_the_full_logits(monkeypatch, temperature):
    from rlhf_cli.algorithms.ppo import entropy_from_logits

    monkeypatch.setattr(lm_forward, "CHUNK_BYTES", 4 * 50 * 3)  # 3 rows per chunk of a 50-word head
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    weights = torch.randn(10)  # what a loss passes back per token

    logp, entropy = lm_forward.frozen_head_logprobs(hidden, head, targets, temperature, with_entropy=True)
    logits = head(hidden) / temperature
    full_logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(logp, full_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach()), rtol=1e-6, atol=1e-6)
    assert not entropy.requires_grad
    (grad,) = torch.autograd.grad((logp * weights).sum(), hidden)
    (full_grad,) = torch.autograd.grad((full_logp * weights).sum(), hidden)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-6)
    assert lm_forward.frozen_head_logprobs(hidden, head, targets, temperature)[1] is None


def test_ppo_token_logprobs_take_the_chunked_path_and_agree(lora_lm, monkeypatch):
    from rlhf_cli.algorithms.ppo import entropy_from_logits
    from rlhf_cli.models import heads
    from rlhf_cli.models.heads import hidden_states, response_states, token_logprobs_and_entropy

    calls = []
    monkeypatch.setattr(heads, "frozen_head_logprobs",
                        lambda *a, **k: calls.append(1) or lm_forward.frozen_head_logprobs(*a, **k))

    torch.manual_seed(3)
    ids = torch.randint(4, 250, (3, 12))
    mask = torch.ones_like(ids)
    states = response_states(hidden_states(lora_lm, ids, mask), 5)  # 7 response positions
    tokens = ids[:, 5:]
    logp, entropy = token_logprobs_and_entropy(lora_lm, states, tokens, 0.8, True)
    logits = lora_lm.get_output_embeddings()(states) / 0.8
    full = torch.log_softmax(logits, dim=-1).gather(2, tokens[..., None]).squeeze(2)
    torch.testing.assert_close(logp, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach()), rtol=1e-5, atol=1e-5)
    assert logp.shape == entropy.shape == tokens.shape
    assert calls == [1] and logp.requires_grad


def _family(name: str):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from families import build_family

    return build_family(name)


def _with_unknown_transform(model):
    """The model's own logits pass through a transform no config names (its head's do not)."""
    def hook(_module, _args, output):
        output.logits = output.logits * 1.7 + 0.5 * torch.cos(output.logits)
        return output

    model.register_forward_hook(hook)
    return model


def test_the_probe_finds_the_known_transform_and_caches_its_verdict():
    from rlhf_cli.models.logits import LogitTransform, head_path

    model = _family("gemma2").train()
    verdict = head_path(model)
    assert verdict.exact and verdict.transform == LogitTransform(1.0, 3.0)
    assert head_path(model) is verdict  # probed once per model
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert head_path(_family("granite")).transform == LogitTransform(0.25)
    assert head_path(_family("llama")).transform.identity


def test_a_model_the_fast_path_does_not_reproduce_takes_the_full_forward_with_one_line(capsys, monkeypatch):
    from rlhf_cli.models import logits as logit_module

    monkeypatch.setattr(logit_module, "_SAID", set())
    model = _with_unknown_transform(_family("llama"))
    torch.manual_seed(5)
    ids = torch.randint(4, 260, (2, 10))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    expected = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
    for _ in range(2):
        torch.testing.assert_close(lm_forward.sequence_logprobs(model, ids, mask, labels)[0], expected,
                                   rtol=0, atol=1e-4)
    reference_copy = _with_unknown_transform(_family("llama"))  # e.g. DPO's frozen reference
    lm_forward.sequence_logprobs(reference_copy, ids, mask, labels)
    assert not logit_module.head_path(reference_copy).exact
    lines = [line for line in capsys.readouterr().err.splitlines() if "full forward" in line]
    assert len(lines) == 1 and "LlamaForCausalLM" in lines[0], lines


def test_ppo_refuses_a_head_it_cannot_use_naming_model_and_stage():
    from rlhf_cli.errors import UserError
    from rlhf_cli.models.heads import hidden_states, token_logprobs_and_entropy
    from rlhf_cli.models.logits import check_head

    model = _with_unknown_transform(_family("opt"))
    with pytest.raises(UserError, match=r"OPTForCausalLM.*cannot be used for ppo"):
        check_head(model, "ppo")
    ids = torch.randint(4, 260, (1, 6))
    states = hidden_states(model, ids, torch.ones_like(ids))
    with pytest.raises(UserError, match="cannot be used for ppo"):
        token_logprobs_and_entropy(model, states, ids, 1.0, False)
    headless = _family("llama")
    headless.get_output_embeddings = lambda: None
    with pytest.raises(UserError, match=r"LlamaForCausalLM.*cannot be used for ppo.*no separate output head"):
        check_head(headless, "ppo")


def test_a_value_or_reward_head_needs_a_decoder_body():
    from rlhf_cli.errors import UserError
    from rlhf_cli.models.heads import hidden_states

    model = _family("gpt2")
    model.base_model_prefix = "body_that_is_not_there"
    ids = torch.randint(4, 260, (1, 6))
    with pytest.raises(UserError, match=r"GPT2LMHeadModel.*no decoder body.*ppo"):
        hidden_states(model, ids, torch.ones_like(ids))


def test_rlhf_ppo_on_an_unusable_head_is_one_error_line_and_writes_nothing(in_process, tmp_path, monkeypatch,
                                                                          capsys, repo):
    from rlhf_cli.models import logits

    reason = "its logits are not its output head's (tried final transform: none)"
    monkeypatch.setattr(logits, "_probe", lambda lm: logits.HeadPath(False, reason=reason))
    code = in_process("ppo", "--recipe", str(repo / "recipes" / "tiny-grpo.yaml"), "-o", "run")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "cannot be used for ppo" in errors[0] and "LlamaForCausalLM" in errors[0]
    assert not (tmp_path / "run").exists()

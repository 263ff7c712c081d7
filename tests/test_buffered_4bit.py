"""A quantized base's CPU 4-bit linears dequantize into shared buffers (`models/buffered_4bit.py`)
and compute bit for bit what bitsandbytes' own `Linear4bit` computes: logits, the gradient
into the LoRA weights and into the input, in fp32 and bf16, in train and eval mode."""

from __future__ import annotations

import pytest
from test_qlora import _ids, _tiny, needs_bnb


def _lora_model(dtype: str):
    import torch

    from rlhf_cli.models.loading import add_lora
    from rlhf_cli.schema import LoraSection

    model = add_lora(_tiny("4bit", dtype), LoraSection(r=8, alpha=16, dropout=0.0))
    for module in model.modules():  # a nonzero B, so the adapter's gradient reaches the input
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05,
                                  generator=torch.Generator().manual_seed(1))
    return model


def _outputs(model) -> dict:
    """Logits (train and eval), the LoRA gradients and the input embeddings' gradient."""
    import torch

    ids = _ids()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model.train()
    logits = model(inputs_embeds=embeds).logits
    logits.float().logsumexp(-1).sum().backward()
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), "eval_logits": eval_logits, "input_grad": embeds.grad, **grads}


def _set_class(model, cls) -> int:
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.__class__ = cls
    return len(layers)


@needs_bnb
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_buffered_4bit_linears_compute_exactly_what_bitsandbytes_computes(rlhf_home, monkeypatch, dtype):
    import bitsandbytes as bnb

    from rlhf_cli.models import buffered_4bit

    model = _lora_model(dtype)
    buffered_class = buffered_4bit.buffered_linear4bit_class()
    assert all(type(m) is buffered_class for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    calls = []
    real = buffered_4bit._dequantized
    monkeypatch.setattr(buffered_4bit, "_dequantized", lambda *a: calls.append(1) or real(*a))
    buffered = _outputs(model)
    layers = _set_class(model, bnb.nn.Linear4bit)
    # Every 4-bit layer took the buffered path: forward (train), backward, forward (eval).
    assert len(calls) == 3 * layers
    theirs = _outputs(model)
    assert len(calls) == 3 * layers  # bitsandbytes' own path does not use our buffers
    assert buffered.keys() == theirs.keys() and any(".lora_A" in name for name in buffered)
    for name, tensor in buffered.items():
        assert tensor.dtype == theirs[name].dtype and bool((tensor == theirs[name]).all()), name


@needs_bnb
def test_a_buffered_4bit_linear_saves_only_its_packed_weight(rlhf_home):
    import torch

    from rlhf_cli.models.buffered_4bit import buffered_linear4bit_class

    layer = _tiny("4bit").model.layers[0].mlp.down_proj
    assert type(layer) is buffered_linear4bit_class()
    saved = []
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert len(saved) == 1 and saved[0].data_ptr() == layer.weight.data_ptr()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_an_unquantized_base_keeps_plain_linears(rlhf_home):
    import torch

    model = _tiny(dtype="bf16")
    assert {type(m) for m in model.modules() if "Linear" in type(m).__name__} == {torch.nn.Linear}

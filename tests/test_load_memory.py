"""Loading a base without holding more than its weights: built-in bases are read from a copy
stored in the run's dtype (same values as casting the float32 original), and a quantized base
keeps nothing of its checkpoint files mapped once loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_qlora import needs_bnb

from rlhf_cli.builtin.model import materialize, weights_for_dtype


def _load(base: str, dtype: str, quantization: str | None = None):
    from rlhf_cli.models.loading import load_causal_lm
    from rlhf_cli.schema import ModelSection

    return load_causal_lm(ModelSection(base=base, dtype=dtype, quantization=quantization))


def _from_fp32_file(dtype, **kwargs):
    """What transformers makes of the canonical float32 `builtin:tiny` in `dtype`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(materialize("tiny")), dtype=dtype, **kwargs)


def _mapped_checkpoints() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if line.rstrip().endswith(".safetensors")}


def _assert_same_state(ours, theirs) -> None:
    import torch

    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    for key, tensor in mine.items():
        assert tensor.dtype == other[key].dtype, key
        assert torch.equal(tensor, other[key]), key


def test_a_bf16_run_reads_a_bf16_copy_of_the_builtin_base_with_the_same_values(rlhf_home):
    import torch
    from safetensors import safe_open

    canonical = materialize("tiny")
    copy = weights_for_dtype(canonical, torch.bfloat16)
    assert copy != canonical and weights_for_dtype(canonical, torch.float32) == canonical
    with safe_open(str(copy / "model.safetensors"), framework="pt") as stored:
        assert {stored.get_tensor(key).dtype for key in stored.keys()} == {torch.bfloat16}
    model = _load("builtin:tiny", "bf16")
    if sys.platform.startswith("linux"):  # its weights are views of the bf16 copy, not casts
        assert str((copy / "model.safetensors").resolve()) in _mapped_checkpoints()
    _assert_same_state(model, _from_fp32_file(torch.bfloat16))
    # Adapters record this name as their base: it stays the canonical directory.
    assert model.name_or_path == str(canonical) and model.config._name_or_path == str(canonical)


def test_other_directories_are_read_as_they_are(tmp_path):
    import torch

    assert weights_for_dtype(tmp_path, torch.bfloat16) == tmp_path


@needs_bnb
def test_a_4bit_base_from_the_bf16_copy_equals_one_quantized_from_the_fp32_file(rlhf_home):
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    _assert_same_state(_load("builtin:tiny", "bf16", "4bit"),
                       _from_fp32_file(torch.bfloat16, quantization_config=config))


@needs_bnb
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_quantized_base_keeps_none_of_its_checkpoint_mapped(rlhf_home, tmp_path):
    """A checkpoint stored in the run's dtype (as users' bf16 shards are): the weights left
    unquantized would be views of the mapped files and keep every page the quantizer read
    resident (713 MiB beside 277 MiB of 4-bit weights for `builtin:large`)."""
    import torch

    _from_fp32_file(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="300KB")
    shards = sorted(str(p.resolve()) for p in (tmp_path / "bf16").glob("*.safetensors"))
    assert len(shards) > 1
    model = _load(str(tmp_path / "bf16"), "bf16", "4bit")
    assert not _mapped_checkpoints() & set(shards)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    del model


def test_cast_copy_is_complete_and_reused(rlhf_home):
    import torch

    canonical = materialize("tiny")
    copy = weights_for_dtype(canonical, torch.float16)
    stamp = (copy / "model.safetensors").stat().st_mtime_ns
    assert weights_for_dtype(canonical, torch.float16) == copy
    assert (copy / "model.safetensors").stat().st_mtime_ns == stamp
    names = {p.name for p in Path(canonical).iterdir()}
    assert names == {p.name for p in copy.iterdir()}

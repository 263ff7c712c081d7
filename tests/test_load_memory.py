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


def _sharded_bf16_checkpoint(directory: Path) -> set[str]:
    """`builtin:tiny` stored in bf16 (as users' shards are) in several files; their resolved paths."""
    import torch

    _from_fp32_file(torch.bfloat16).save_pretrained(directory, max_shard_size="300KB")
    shards = {str(p.resolve()) for p in directory.glob("*.safetensors")}
    assert len(shards) > 1
    return shards


def _resident_bytes(paths: set[str]) -> int:
    from rlhf_cli.engine.memory import file_mappings

    return sum(m.resident for m in file_mappings(".safetensors") if m.path in paths)


def _pages_in_memory(tensor) -> tuple[int, int]:
    """(pages of the tensor's bytes this process has in memory, pages it spans), from the
    present bit of /proc/self/pagemap."""
    import mmap
    import struct

    first = tensor.data_ptr() // mmap.PAGESIZE
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", pagemap.read((last - first + 1) * 8))
    return sum(entry >> 63 for entry in entries), last - first + 1


def _wide_vocabulary_bf16_checkpoint(directory: Path) -> set[str]:
    """A one-layer LLaMA with a 32000 x 256 embedding (16 MiB: 4000 pages), stored in bf16 in
    several files; their resolved paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, max_shard_size="8MB")
    shards = {str(p.resolve()) for p in directory.glob("*.safetensors")}
    assert len(shards) > 1
    return shards


@needs_bnb
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps and pagemap")
def test_a_quantized_base_holds_no_page_the_quantizer_read(tmp_path):
    """The weights left unquantized stay views of the checkpoint, as a bf16 base's do, but none
    of the pages the quantizer read stays resident (they were 713 MiB beside 277 MiB of 4-bit
    weights for `builtin:large`); the embedding's rows come back as tokens look them up, not
    the whole table (which copying it out would write, and hold)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.models.quantization import quantized_load_kwargs

    directory = tmp_path / "bf16"
    shards = _wide_vocabulary_bf16_checkpoint(directory)
    model = _load(str(directory), "bf16", "4bit")
    assert _resident_bytes(shards) == 0
    embedding = model.model.embed_tokens.weight
    assert embedding.dtype == torch.bfloat16
    present, spanned = _pages_in_memory(embedding)
    assert present == 0 and spanned >= 4000
    with torch.no_grad():
        model(torch.tensor([[1, 16000, 31000]]))
    # Three rows, each with what the kernel maps about a fault (16 pages by default, a whole
    # page-cache folio, up to 2 MiB, where the file system has large folios: 128 pages here).
    assert 3 <= _pages_in_memory(embedding)[0] <= spanned // 2
    assert _resident_bytes(shards) > 0
    plain = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16,
                                                 **quantized_load_kwargs("4bit", torch.bfloat16))
    _assert_same_state(model, plain)
    del model


@needs_bnb
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_written_checkpoint_mapping_is_copied_out_not_dropped(tmp_path):
    """Dropping the pages of a private mapping that was written would bring back the file's
    bytes: a weight changed in place after loading keeps its change, in memory of its own."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.engine.memory import file_mappings
    from rlhf_cli.models.quantization import after_quantized_load, quantized_load_kwargs

    shards = _sharded_bf16_checkpoint(tmp_path / "bf16")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16,
                                                 **quantized_load_kwargs("4bit", torch.bfloat16))
    norm = model.model.norm.weight
    assert any(m.holds(norm.data_ptr()) for m in file_mappings(".safetensors") if m.path in shards)
    with torch.no_grad():
        norm[0] = 7.0  # copy-on-write: the mapping no longer equals its file
    after_quantized_load(model)
    assert norm[0].item() == 7.0
    assert not any(m.holds(norm.data_ptr()) for m in file_mappings(".safetensors"))
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

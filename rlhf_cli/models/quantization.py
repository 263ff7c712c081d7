"""QLoRA: loading a base in 4-bit (nf4) or 8-bit (LLM.int8) through bitsandbytes.

Only the base's transformer-block linears are quantized (transformers keeps the embeddings,
the LM head and a classifier's `score` in `model.dtype`); LoRA adapters and heads train in
`model.dtype` on top. A run on a quantized base writes `quantization.json` beside its adapter
so that `rlhf merge-lora` rebuilds the exact weights the adapter was trained against.

We do not call peft's `prepare_model_for_kbit_training`: it casts every bf16/fp16 parameter
(embeddings, norms, LM head) to fp32, which doubles the unquantized bytes of a bf16 run, and it
turns gradient checkpointing on regardless of `model.gradient_checkpointing`. Its other jobs
are done already: `get_peft_model` freezes the base, and our non-reentrant checkpointing
needs no `enable_input_require_grads`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: preflight checks stay cheap
    import torch

QUANTIZATION_FILE = "quantization.json"
INSTALL_HINT = "pip install 'rlhf-cli[qlora]' (or pip install 'bitsandbytes>=0.47')"


def bitsandbytes_installed() -> bool:
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def require_bitsandbytes(where: str = "model.quantization") -> None:
    if not bitsandbytes_installed():
        raise UserError(f"a quantized base needs bitsandbytes, which is not installed: {INSTALL_HINT}",
                        where=where)


def bnb_config(kind: str, compute_dtype: torch.dtype):
    """4bit: nf4 with double quantization, computing in `compute_dtype`; 8bit: LLM.int8."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {kind!r}")


def quantized_load_kwargs(kind: str | None, compute_dtype: torch.dtype) -> dict:
    """Extra `from_pretrained` arguments for a quantized base ({} when `kind` is None)."""
    if kind is None:
        return {}
    require_bitsandbytes()
    return {"quantization_config": bnb_config(kind, compute_dtype), **_device_map()}


def _device_map() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    # bitsandbytes models cannot be moved after loading (8-bit refuses `.to`): load each
    # process's copy straight onto its own GPU.
    return {"device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def after_quantized_load(model) -> None:
    """Settle a freshly loaded quantized base: let go of the checkpoint pages the quantizer read,
    hand the loader's freed heap back, and turn off bitsandbytes' CPU inference repacking."""
    if quantization_of(model) is None:
        return
    _map_unquantized_tensors_lazily(model)
    from ..engine.memory import release_freed_memory

    release_freed_memory()
    _no_cpu_inference_repacking(model)


def _map_unquantized_tensors_lazily(model) -> None:
    """Hold the weights bitsandbytes left unquantized (embeddings, head, norms) the way a bf16
    base holds all of its weights: as views of the checkpoint's memory map, paged in as they
    are used; and take out of memory every page the quantizer read.

    Loaded from a checkpoint stored in the run's dtype, those tensors are views of the mapped
    safetensors files, and one of them keeps its whole file mapped: every page the quantizer
    read stayed resident, so a 4-bit `builtin:large` held its bf16 file (713 MiB) besides its
    own 277 MiB. Copying them out instead writes, and so holds, all of the input embedding,
    whose rows no token looks up a bf16 base never reads in (62.5 MiB of `builtin:large`, a
    GiB of a 152k-entry vocabulary at 3584 wide). Dropping a mapping's pages is only sound
    while it equals its file: every other tensor (of a mapping something wrote to, or of
    memory that is no safetensors mapping) is copied out, as all of them were before.
    Parameters are deduplicated by `parameters()`, so tied weights stay tied.
    """
    import gc

    import bitsandbytes as bnb

    from ..engine.memory import drop_resident_pages, file_mappings

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    unwritten = [mapping for mapping in file_mappings(".safetensors") if not mapping.written]
    for param in model.parameters():
        if not isinstance(param, quantized) and not any(m.holds(param.data_ptr()) for m in unwritten):
            param.data = param.data.clone()  # its own memory: it may view a mapping we cannot drop
    gc.collect()  # the last views of the mapped files may sit in reference cycles
    for mapping in file_mappings(".safetensors"):
        if not mapping.written:
            drop_resident_pages(mapping)


def _no_cpu_inference_repacking(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a `Linear4bit` run in eval mode under no_grad rewrites its
    weight in place into a packed layout, which every later forward (training included)
    then uses through a kernel that is only meant for inference; it also asserts that the
    output size is a multiple of 32, which small models break. PPO alternates the two modes.
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantization_of(model) -> dict | None:
    """The bitsandbytes config of a (possibly peft-wrapped) model, None when unquantized."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def write_quantization_record(model, directory: Path) -> None:
    """`quantization.json` beside an adapter trained on a quantized base (nothing otherwise)."""
    quantization = quantization_of(model)
    if quantization is not None:
        (Path(directory) / QUANTIZATION_FILE).write_text(json.dumps(quantization, indent=2, default=str))


def read_quantization_record(directory: Path):
    """The `BitsAndBytesConfig` an adapter was trained under, or None."""
    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    require_bitsandbytes(where=str(path))
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig.from_dict(json.loads(path.read_text()))


def recorded_load_kwargs(directory: Path) -> dict:
    """`from_pretrained` arguments that load an adapter's base as it was trained: quantized
    as its `quantization.json` says, or ({}) as it is."""
    quantization = read_quantization_record(directory)
    return {} if quantization is None else {"quantization_config": quantization, **_device_map()}


def quantization_state_keys(module) -> set[str]:
    """The entries of `module.state_dict()` that are no parameter and no buffer: the state
    bitsandbytes keeps beside its packed weights (4-bit: `weight.absmax`, `weight.quant_map`,
    `weight.nested_*`, `weight.quant_state.*`; 8-bit: `SCB`, `weight_format`). Empty for a
    model without quantized layers."""
    held = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    held |= {name for name, _ in module.named_buffers(remove_duplicate=False)}
    return set(module.state_dict(keep_vars=True)) - held


def load_state_over_quantized_base(module, state: dict) -> None:
    """Load a whole-model state dict (DeepSpeed's checkpoint of `module`) into `module`, whose
    quantized base was rebuilt from `model.base` as the run resumed.

    bitsandbytes writes its quantization state into a state dict but takes the 4-bit one back
    only through `from_pretrained`, so torch's strict `load_state_dict` refuses a quantized
    model's own state dict ("Unexpected key(s) in state_dict: ...weight.absmax"). That state
    describes the frozen base, which the resumed run quantized again: it must equal the saved
    one (else the checkpoint was trained on another base), and everything else loads strictly.
    """
    extra = quantization_state_keys(module)
    live = module.state_dict()
    differing = sorted(key for key in extra if key not in state or not _same_tensor(state[key], live[key]))
    if differing:
        raise ValueError(f"its quantized base differs from this run's ({len(differing)} bitsandbytes "
                         f"state entries, first {differing[0]})")
    module.load_state_dict({key: value for key, value in state.items() if key not in extra}, strict=True)


def _same_tensor(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


def dequantized(model, dtype: torch.dtype):
    """The same model with plain `nn.Linear` layers holding the dequantized weights, all in
    `dtype`, and no quantization config (transformers removes it): what `merge_and_unload`
    and plain transformers need."""
    return model.dequantize(dtype=dtype).to(dtype)

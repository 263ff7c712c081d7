"""Loading bases and tokenizers, and putting LoRA adapters on them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..schema import LoraSection, ModelSection
from .logits import say_once
from .lora_targets import auto_targets, remapped_by_peft
from .quantization import after_quantized_load, quantized_load_kwargs
from .remote_code import check_trust, refusal

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_base(spec: str) -> str:
    """`builtin:tiny` -> its materialised directory; a run directory -> its `final/`.

    A LoRA run cannot be a base as it is: an adapter trained on top of it would name the
    original base and silently lose the first adapter. It must be merged first.
    """
    from ..builtin.model import resolve_builtin

    builtin = resolve_builtin(spec)
    if builtin is not None:
        return str(builtin)
    path = Path(spec).expanduser()
    if (path / "final").is_dir():
        path = path / "final"
    if (path / "adapter_config.json").is_file():
        raise UserError(f"{spec} is a LoRA adapter, not a model: merge it first with "
                        f"`rlhf merge-lora {spec} --out DIR` and use DIR as the base")
    return str(path) if path.exists() else spec


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer from {source}: {_first_line(exc)}") from None
    set_pad_token(tokenizer)
    return tokenizer


def set_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token without resizing the model's embeddings.

    Prefer its own pad, then `unk` (LLaMA and LLaMA 2 ship no pad but have `<unk>`), and
    only then EOS. Our collators build attention and label masks explicitly and never
    from pad-id equality, so even pad == EOS cannot mask the real EOS.
    """
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise UserError("the tokenizer has neither a pad, an unk nor an EOS token")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_causal_lm(section: ModelSection, source: str | None = None):
    from transformers import AutoModelForCausalLM

    source = source or resolve_base(section.base)
    check_trust(source, section.trust_remote_code)  # before transformers prompts on the terminal
    dtype = torch_dtype(section.dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": section.trust_remote_code,
              **quantized_load_kwargs(section.quantization, dtype)}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(weights_source(source, dtype), **kwargs)
    except (OSError, ValueError) as exc:
        error = refusal(exc, source) or UserError(f"cannot load model {section.base}: {_first_line(exc)}")
        raise error from None
    name_after(model, source)
    after_quantized_load(model)
    if section.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def weights_source(source: str, dtype: torch.dtype) -> str:
    """The directory to read `source`'s weights from in `dtype`: for a built-in base, its
    copy stored in that dtype (see `builtin.model.weights_for_dtype`); otherwise `source`."""
    from ..builtin.model import weights_for_dtype

    return str(weights_for_dtype(source, dtype)) if Path(source).is_dir() else source


def name_after(model, source: str) -> None:
    """Name the loaded model after `source`, whichever copy its weights came from: adapters
    record this name as their base, and one-base PPO compares it with the policy's base."""
    model.config._name_or_path = source
    model.name_or_path = source


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without the
    # enable_input_require_grads hack, and with DDP without find_unused_parameters.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def lora_config(section: LoraSection, task_type: str = "CAUSAL_LM", modules_to_save=None, model=None):
    """peft's LoraConfig for `section`; `model` lets `auto` find MoE experts (lora_targets.py)."""
    from peft import LoraConfig

    targets, parameters, dropout = section.target_modules, [], section.dropout
    if targets == "auto":
        targets, parameters = auto_targets(model)
        dropout = _expert_dropout(section.dropout) if parameters else dropout
    elif isinstance(targets, str) and targets != "all-linear":
        targets = [targets]  # peft reads a bare string as a regex over full module names
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        bias=section.bias,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def _expert_dropout(dropout: float) -> float:
    """0: peft's LoRA on expert parameters has no dropout, and an adapter has only one."""
    if dropout:
        say_once(f"lora.dropout {dropout} -> 0: LoRA on the MoE experts (lora.target_modules: auto) "
                 "has no dropout in peft; list lora.target_modules to keep it without the experts")
    return 0.0


def add_lora(model, section: LoraSection, task_type: str = "CAUSAL_LM", modules_to_save=None):
    from peft import get_peft_model

    config = lora_config(section, task_type, modules_to_save, model)
    targets = config.target_modules  # peft edits the config in place as it injects
    requested = targets if isinstance(targets, str) else set(targets)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"model.lora.target_modules: {_first_line(exc)}") from None
    lost = remapped_by_peft(requested, peft_model.peft_config[peft_model.active_adapter])
    if lost:
        say_once(f"lora.target_modules: auto: peft maps {', '.join(lost)} to the MoE experts of "
                 f"{model.config.model_type} (its transformers-4 names): layers of theirs outside the "
                 "experts get no LoRA")
    return peft_model


def is_quantized(config) -> bool:
    return getattr(config, "quantization_config", None) is not None


def _numel(param) -> int:
    # Under ZeRO-3 a partitioned parameter is empty here; DeepSpeed keeps its real size. A
    # 4-bit weight packs two values a byte; its quantization state keeps the real shape.
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return quant_state.shape.numel()
    return getattr(param, "ds_numel", None) or param.numel()


def count_parameters(model) -> tuple[int, int]:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total

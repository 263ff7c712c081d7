"""The decoder body of a causal LM, found under whatever wraps it, and its last hidden states.

Every path that reads hidden states (the fast log-prob paths, reward and value heads) goes
through `decoder_states`, so that positions, caching and the missing-body error are the same.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def inner_causal_lm(model):
    """The transformers model under DDP/DeepSpeed and peft's wrappers (LoRA layers stay injected)."""
    while type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
        model = model.module
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def model_name(lm) -> str:
    """How messages name a model: its source and family (`gpt2 (GPT2LMHeadModel)`)."""
    source = getattr(lm.config, "_name_or_path", "") or getattr(lm.config, "model_type", "model")
    return f"{source} ({type(lm).__name__})"


def has_decoder(lm) -> bool:
    prefix = getattr(lm, "base_model_prefix", "")
    return bool(prefix) and isinstance(getattr(lm, prefix, None), torch.nn.Module)


def decoder_of(lm, stage: str = "this stage"):
    """The transformer body (LLaMA: `model`, GPT-2: `transformer`); an error without one."""
    if not has_decoder(lm):
        raise UserError(f"model {model_name(lm)} has no decoder body (`base_model_prefix`) to read "
                        f"hidden states from, which {stage} needs for its heads")
    return getattr(lm, lm.base_model_prefix)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as generation does with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_states(model, input_ids, attention_mask, stage: str = "this stage") -> torch.Tensor:
    """The body's last hidden states [B, T, H] (positions counted over real tokens)."""
    return decoder_of(inner_causal_lm(model), stage)(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask), use_cache=False).last_hidden_state

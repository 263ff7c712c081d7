"""Loading a base as a one-label reward model: transformers' sequence classifier where it has
one, otherwise the causal LM's body with our own score head (models/scored_lm.py).

Apart from models/reward.py (scoring), which ScoredCausalLM itself scores with.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..schema import ModelSection
from .decoder import decoder_of
from .loading import torch_dtype
from .quantization import after_quantized_load, quantized_load_kwargs
from .remote_code import check_trust


def has_sequence_classifier(config) -> bool:
    """Whether transformers (or the model's own code, through its auto_map) has a
    *ForSequenceClassification class for this config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    return (config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
            or "AutoModelForSequenceClassification" in auto_map)


def sequence_classifier(source: str, dtype: torch.dtype | None, trust_remote_code: bool, **load_kwargs):
    """`source` as a one-label sequence classifier: transformers' class when there is one,
    otherwise (remote code such as Baichuan 2; Cohere and Granite in transformers 5) the causal
    LM's body with a fresh `score` head.

    Every reward-model load goes through here (training, PPO, eval), so an adapter saved on
    one loads on the other. `dtype` None keeps transformers' default; `load_kwargs` go to
    `from_pretrained` (a quantized base's). May raise OSError/ValueError as `from_pretrained` does.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    check_trust(source, trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code, **({"dtype": dtype} if dtype is not None else {}),
              **load_kwargs}
    if not has_sequence_classifier(config):
        from .scored_lm import ScoredCausalLM

        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        after_quantized_load(lm)
        return ScoredCausalLM(lm)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **kwargs)
    after_quantized_load(model)
    return model


def load_sequence_classifier(section: ModelSection, source: str, pad_token_id: int):
    """The base as a sequence classifier with one label (a fresh head)."""
    dtype = torch_dtype(section.dtype)
    try:
        model = sequence_classifier(source, dtype, section.trust_remote_code,
                                    **quantized_load_kwargs(section.quantization, dtype))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {section.base} as a reward model: {str(exc).splitlines()[0]}") from None
    # Saved with the model so that plain transformers batches score the right token.
    model.config.pad_token_id = pad_token_id
    if not hasattr(model, "score"):
        raise UserError(f"{type(model).__name__} has no `score` head; reward models need a "
                        "LLaMA-style *ForSequenceClassification class")
    decoder_of(model, "a reward model")  # the score reads the body's states: an error without one
    # The head trains (and is the PPO critic's start): float32 on a bf16/fp16 body, as peft
    # keeps LoRA's weights, so that AdamW's small updates are not rounded away.
    model.score.float()
    return model

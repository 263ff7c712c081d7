"""Reward models: a causal LM body with a scalar head, scored at the last real token."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..schema import ModelSection
from .lm_forward import decoder_of, inner_causal_lm, position_ids_from
from .loading import torch_dtype


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention 1 in each row, for any padding side.

    Never from pad-id equality: pad may equal EOS, and the EOS is the token we want.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def score_sequences(model, input_ids, attention_mask) -> torch.Tensor:
    """Scalar reward per row [B] from the head applied to the last real token's state."""
    lm = inner_causal_lm(model)
    hidden = decoder_of(lm)(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from(attention_mask),
                            use_cache=False).last_hidden_state
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return lm.score(picked).squeeze(-1).float()


def load_sequence_classifier(section: ModelSection, source: str, pad_token_id: int):
    """The base as `AutoModelForSequenceClassification` with one label (a fresh head)."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch_dtype(section.dtype),
            trust_remote_code=section.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {section.base} as a reward model: {str(exc).splitlines()[0]}") from None
    # Saved with the model so that plain transformers batches score the right token.
    model.config.pad_token_id = pad_token_id
    if not hasattr(model, "score"):
        raise UserError(f"{type(model).__name__} has no `score` head; reward models need a "
                        "LLaMA-style *ForSequenceClassification class")
    return model

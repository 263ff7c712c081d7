"""Reward models: a causal LM body with a scalar head, scored at the last real token."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..schema import ModelSection
from .lm_forward import decoder_of, inner_causal_lm, position_ids_from
from .loading import torch_dtype
from .quantization import after_quantized_load, quantized_load_kwargs


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention 1 in each row, for any padding side.

    Never from pad-id equality: pad may equal EOS, and the EOS is the token we want.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def decoder_states(model, input_ids, attention_mask) -> torch.Tensor:
    """The body's last hidden states [B, T, H] (positions counted over real tokens)."""
    return decoder_of(inner_causal_lm(model))(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask), use_cache=False).last_hidden_state


def scores_from_states(model, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
    """Scalar reward per row [B]: the score head on the last real token's state."""
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return inner_causal_lm(model).score(picked).squeeze(-1).float()


def score_sequences(model, input_ids, attention_mask) -> torch.Tensor:
    """Scalar reward per row [B] from the head applied to the last real token's state."""
    return scores_from_states(model, decoder_states(model, input_ids, attention_mask), attention_mask)


def _checkpoint_file(source: str, name: str) -> str | None:
    """A file of a local model directory or of a hub model (from the cache when offline)."""
    from transformers.utils import cached_file

    try:
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


def base_lm_head(source: str, lm) -> torch.Tensor:
    """The base model's output embedding [V, H] (frozen), which a sequence classifier drops.

    Tied models reuse the input embedding; otherwise `lm_head.weight` is read from the
    base's safetensors files, without loading a second model.
    """
    if getattr(lm.config, "tie_word_embeddings", False):
        return lm.get_input_embeddings().weight.detach()
    from safetensors import safe_open

    index = _checkpoint_file(source, "model.safetensors.index.json")
    if index is not None:
        import json
        from pathlib import Path

        name = json.loads(Path(index).read_text())["weight_map"].get("lm_head.weight")
        file = _checkpoint_file(source, name) if name else None
    else:
        file = _checkpoint_file(source, "model.safetensors")
    if file is not None:
        with safe_open(file, framework="pt") as handle:
            if "lm_head.weight" in handle.keys():
                return handle.get_tensor("lm_head.weight")
    raise UserError(f"rm.lm_loss_weight needs the base's LM head (lm_head.weight), not found in {source}; "
                    "set rm.lm_loss_weight to 0", where="rm.lm_loss_weight")


def load_sequence_classifier(section: ModelSection, source: str, pad_token_id: int):
    """The base as `AutoModelForSequenceClassification` with one label (a fresh head)."""
    from transformers import AutoModelForSequenceClassification

    dtype = torch_dtype(section.dtype)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=dtype, trust_remote_code=section.trust_remote_code,
            **quantized_load_kwargs(section.quantization, dtype),
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {section.base} as a reward model: {str(exc).splitlines()[0]}") from None
    after_quantized_load(model)
    # Saved with the model so that plain transformers batches score the right token.
    model.config.pad_token_id = pad_token_id
    if not hasattr(model, "score"):
        raise UserError(f"{type(model).__name__} has no `score` head; reward models need a "
                        "LLaMA-style *ForSequenceClassification class")
    return model

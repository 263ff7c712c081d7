"""Reward models: a causal LM body with a scalar head, scored at the last real token."""

from __future__ import annotations

import torch

from ..algorithms.masked import last_token_index
from ..errors import UserError
from .decoder import decoder_states, inner_causal_lm


def apply_head(head: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [...] float32 through a scalar head [H -> 1]; the states are cast to the
    head's dtype (a float32 head on a bf16 body would otherwise fail outside autocast)."""
    return head(states.to(next(head.parameters()).dtype)).squeeze(-1).float()


def last_token_scores(head: torch.nn.Module, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
    """Scalar score per row [B]: `head` on the state of each row's last real token (its EOS).

    A row with no real token (all padding) has no score: NaN, which the NaN/inf checks catch,
    rather than a number read off a padding position.
    """
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
    scores = apply_head(head, picked)
    return torch.where(last >= 0, scores, torch.full_like(scores, float("nan")))


def scores_from_states(model, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
    """Scalar reward per row [B]: the RM's score head on the last real token's state."""
    # The head may be float32 on a bf16 body (load_sequence_classifier): it reads float32 states.
    return last_token_scores(inner_causal_lm(model).score, hidden, attention_mask)


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
    if getattr(lm, "lm_head_is_linear", True) is False:  # e.g. Baichuan 2's NormHead
        raise UserError(f"rm.lm_loss_weight needs the base's LM head as a plain linear layer; {source}'s "
                        "own code computes its logits otherwise: set rm.lm_loss_weight to 0",
                        where="rm.lm_loss_weight")
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

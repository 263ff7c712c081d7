"""A reward model built from a causal LM whose code has no sequence-classification class.

Models that bring their own code (Baichuan, Baichuan 2) ship only a causal LM. A reward
model, a PPO critic and `rlhf eval` need the body with a scalar `score` head, laid out as
transformers' `*ForSequenceClassification` classes are: the body under the LM's
`base_model_prefix`, and `score` a bias-free Linear(hidden, 1). The adapter keys then match
the causal LM's, so the one-base PPO arrangements load an RM adapter trained on this class
onto the policy's causal LM unchanged, and peft saves the head with the adapter (SEQ_CLS).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from .reward import score_sequences


class ScoredCausalLM(PreTrainedModel):
    """`lm`'s decoder body (shared, not copied) with a freshly drawn scalar `score` head."""

    supports_gradient_checkpointing = False
    # The body was loaded by its own class, which already chose (and checked) its attention
    # implementation; this wrapper only reads its states, so it accepts whatever that was.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, lm):
        from transformers.initialization import no_init_weights

        super().__init__(lm.config)
        # The instance's prefix, so that `decoder_of` finds the body as on the causal LM.
        self.base_model_prefix = lm.base_model_prefix
        # `rm.lm_loss_weight` reads the LM head's weight from disk: only exact for a Linear head.
        self.lm_head_is_linear = type(lm.get_output_embeddings()) is torch.nn.Linear
        body = getattr(lm, lm.base_model_prefix)
        dtype = next(body.parameters()).dtype
        self.add_module(lm.base_model_prefix, body)
        self.score = torch.nn.Linear(lm.config.hidden_size, 1, bias=False, dtype=dtype)
        with no_init_weights():  # post_init would re-draw the trained body's weights
            self.post_init()
        # As transformers draws a classifier head: normal(0, initializer_range).
        std = getattr(lm.config, "initializer_range", 0.02) or 0.02
        with torch.no_grad():
            self.score.weight.normal_(0.0, std)

    def get_input_embeddings(self):
        return getattr(self, self.base_model_prefix).get_input_embeddings()

    def get_output_embeddings(self):
        return None  # no LM head: peft's `all-linear` then leaves `score` to modules_to_save

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """Scores [B, 1] at each row's last real token (as `rlhf eval` and PPO read them)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        scores = score_sequences(self, input_ids, attention_mask)
        return SequenceClassifierOutputWithPast(logits=scores[:, None])

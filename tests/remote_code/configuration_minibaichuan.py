"""Configuration of MiniBaichuan, a small Baichuan-2-style model that ships its own code.

Written for rlhf's tests (not Baichuan's published code): it is loaded through a
config.json `auto_map` with `trust_remote_code=True`, as Baichuan and Baichuan 2 are.
"""

from transformers import PretrainedConfig


class MiniBaichuanConfig(PretrainedConfig):
    model_type = "minibaichuan"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, vocab_size=264, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                 rope_theta=10000.0, initializer_range=0.02, use_cache=True, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

"""Tiny random causal LMs of many Hugging Face families, built locally (no download).

Each family is built from its transformers config class: fp32, dropout 0, two layers,
hidden 32, and the built-in byte tokenizer's vocabulary, so that the tokenizer can be
saved beside the weights and the directory works as `model.base`. Families that apply a
final logit transform get a value far from 1 (Gemma 2/3 soft-cap, Cohere's scale,
Granite's divisor) and every output head is redrawn wide enough (logits of a few units)
that a path skipping the transform gives visibly different log-probs.

API (used by several test files; keep it stable):
    FAMILIES: dict[str, callable]   name -> () -> config
    TIED: set of names whose output head is the input embedding
    build_family(name) -> model     the same weights on every call, in eval mode
    save_family(name, directory) -> Path   model + built-in tokenizer, loadable offline
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from rlhf_cli.builtin.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

SEED = 4321
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
POSITIONS = 512

_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
# LLaMA-style decoders (separate q/k/v/o and gate/up/down projections).
_LLAMA_LIKE = {
    "vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "intermediate_size": FFN,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": POSITIONS, "attention_dropout": 0.0, **_IDS,
}
_MOE = {"num_experts_per_tok": 2}


def _llama_like(cls, tied: bool, **extra):
    return lambda: cls(**{**_LLAMA_LIKE, "tie_word_embeddings": tied, **extra})


FAMILIES: dict[str, callable] = {
    "llama": _llama_like(tf.LlamaConfig, tied=False),
    "mistral": _llama_like(tf.MistralConfig, tied=False),
    "mixtral": _llama_like(tf.MixtralConfig, tied=False, num_local_experts=4, **_MOE),
    "qwen2": _llama_like(tf.Qwen2Config, tied=True),
    "qwen3": _llama_like(tf.Qwen3Config, tied=True, head_dim=8),
    "qwen3_moe": _llama_like(tf.Qwen3MoeConfig, tied=False, head_dim=8, num_experts=4,
                             moe_intermediate_size=32, **_MOE),
    "gemma": _llama_like(tf.GemmaConfig, tied=True, head_dim=8),
    "gemma2": _llama_like(tf.Gemma2Config, tied=True, head_dim=8, final_logit_softcapping=3.0,
                          query_pre_attn_scalar=8),
    "gemma3_text": _llama_like(tf.Gemma3TextConfig, tied=True, head_dim=8, final_logit_softcapping=3.0,
                               query_pre_attn_scalar=8),
    "phi3": _llama_like(tf.Phi3Config, tied=False, resid_pdrop=0.0, embd_pdrop=0.0),
    "cohere": _llama_like(tf.CohereConfig, tied=True, logit_scale=0.25),
    "granite": _llama_like(tf.GraniteConfig, tied=False, logits_scaling=4.0, embedding_multiplier=2.0,
                           residual_multiplier=0.5, attention_multiplier=0.25),
    "olmo2": _llama_like(tf.Olmo2Config, tied=False),
    "stablelm": _llama_like(tf.StableLmConfig, tied=False, hidden_dropout=0.0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=POSITIONS, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=False, **_IDS),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **_IDS),
    "opt": lambda: tf.OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=True, **_IDS),
    "bloom": lambda: tf.BloomConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=True, **_IDS),
    "falcon": lambda: tf.FalconConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=True, **_IDS),
}

TIED = {name for name, config in FAMILIES.items() if config().tie_word_embeddings}


def build_config(name: str):
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]()


def build_family(name: str):
    """A fresh random model of family `name`: fp32, eval mode, the same weights on every call.

    The caller's RNG state is left untouched (the seed is applied inside `fork_rng`).
    """
    config = build_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(SEED)
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _widen_output_head(model)
    model.generation_config = tf.GenerationConfig(**_IDS)
    return model.eval()


def _widen_output_head(model) -> None:
    """Redraw the output embedding with std 3/sqrt(hidden): logits of a few units, so that a
    soft-cap of 3 or a scale of 4 changes the log-probs by far more than any tolerance."""
    head = model.get_output_embeddings()
    std = 3.0 * model.config.hidden_size**-0.5
    with torch.no_grad():
        head.weight.normal_(0.0, std)


def save_family(name: str, directory) -> Path:
    """Write family `name` (weights, config, generation config) and the built-in tokenizer
    into `directory`; returns it. It loads with plain `from_pretrained`, fully offline."""
    directory = Path(directory)
    model = build_family(name)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory

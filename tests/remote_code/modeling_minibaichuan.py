"""MiniBaichuan: a small Baichuan-2-style causal LM that ships its own modelling code.

Written for rlhf's tests (not Baichuan's published code). What matters to a trainer is the
shape of the thing: a LLaMA-like decoder whose attention uses one fused `W_pack` projection
to queries, keys and values (3 x hidden), RMSNorm, rotary positions, a SwiGLU MLP, and
Baichuan 2's NormHead, an output head that normalises each vocabulary row of its weight
before the matmul (so logits are not `Linear(h)`). It follows transformers 5's calling
conventions: `cache` (a `Cache`), `position_ids`, a 2-D padding mask, and GenerationMixin.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_minibaichuan import MiniBaichuanConfig


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def rotary(x, position_ids, theta):
    """Rotate [B, heads, T, d] by each token's position (rotate-half convention)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = position_ids[:, None, :, None].float() * inv_freq  # [B, 1, T, d/2]
    angles = torch.cat([angles, angles], dim=-1)
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.theta = config.rope_theta
        self.layer_idx = layer_idx
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden, bias, position_ids, cache):
        batch, length, _ = hidden.shape
        qkv = self.W_pack(hidden).view(batch, length, 3, self.heads, self.head_dim)
        query, key, value = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        query, key = rotary(query, position_ids, self.theta), rotary(key, position_ids, self.theta)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
        weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        out = (weights @ value).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, bias, position_ids, cache):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), bias, position_ids, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class NormHead(nn.Module):
    """Baichuan 2's output head: logits = h @ normalize(W, rows).T, W [vocab, hidden]."""

    def __init__(self, hidden_size, vocab_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden):
        return F.linear(hidden, F.normalize(self.weight, dim=-1))


def attention_bias(attention_mask, batch, query_len, past_len, dtype, device):
    """Additive [B, 1, Tq, Tk] bias: causal, and no attention to padded keys.

    A padded (left-pad) query row sees no real key at all; the finite minimum keeps its
    softmax uniform instead of NaN, and its output is never read.
    """
    total = past_len + query_len
    query_pos = torch.arange(past_len, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= query_pos  # [Tq, Tk]
    allowed = allowed[None, None].expand(batch, 1, query_len, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -total:].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class MiniBaichuanPreTrainedModel(PreTrainedModel):
    config_class = MiniBaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, NormHead):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class MiniBaichuanModel(MiniBaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=hidden.device)[None].expand(batch, -1)
        bias = attention_bias(attention_mask, batch, length, past, hidden.dtype, hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, bias, position_ids, cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       cache=cache if use_cache else None)


class MiniBaichuanForCausalLM(MiniBaichuanPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MiniBaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

"""The Gemma 3 / Gemma 4 text decoder: embedding, layers, final norm, tied head, logit softcap.

Reads top to bottom like the forward pass in reference/gemma4-formats.md. Gemma 3 and Gemma 4 differ
only by config fields (attention_scale, use_v_norm, use_layer_scalar, enable_moe_block, rope).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from .attention import Attention
from .layers import GatedMLP, RMSNorm
from .moe import Experts, Router


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = GatedMLP(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.moe = config.enable_moe_block
        if self.moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        if config.use_layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, h: torch.Tensor, qpos: torch.Tensor, kv) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), qpos, kv))

        residual = h
        m = self.mlp(self.pre_feedforward_layernorm(residual))
        if self.moe:
            flat = residual.reshape(-1, residual.shape[-1])
            weights, experts = self.router(flat)  # routed on the residual, not the normed input
            e = self.experts(self.pre_feedforward_layernorm_2(flat), experts, weights).view_as(residual)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(e)
        h = residual + self.post_feedforward_layernorm(m)

        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (a quantised embedding carries it, having no float weight)."""
        return getattr(self.embed_tokens, "dtype", None) or self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        return KVCache(self.config, batch, capacity, self.dtype, self.device)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids, positions: [B, T] (position -1 marks left padding). Returns final-normed hidden states."""
        # The scale is rounded to the weight dtype first, as the reference does.
        h = self.embed_tokens(ids) * torch.tensor(self.config.embed_scale, dtype=self.dtype)
        for layer, kv in zip(self.layers, cache.layers):
            h = layer(h, positions, kv)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits, soft-capped: cap * tanh(logits / cap)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        elif hasattr(self.embed_tokens, "linear"):  # quantised tied embedding
            logits = self.embed_tokens.linear(hidden)
        else:
            logits = hidden @ self.embed_tokens.weight.T
        logits = logits.float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

"""The Gemma 3 / Gemma 4 text decoder: embedding, layers, final norm, tied head, logit softcap.

Reads top to bottom like the forward pass in reference/gemma4-formats.md. Gemma 3 and Gemma 4 differ
only by config fields (attention_scale, use_v_norm, use_layer_scalar, enable_moe_block, rope). How a
weight is stored and which kernel multiplies it is decided below the model (quant/, native/); the fused
native layer is swapped in at load (model/load.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kv import KVCache
from ..config import ModelConfig
from ..quant.modules import Embedding, Linear
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

    def forward(self, h: torch.Tensor, qpos: torch.Tensor, kv, sees_until: torch.Tensor | None = None) -> torch.Tensor:
        x = self.input_layernorm(h)
        a = self.self_attn(x, qpos, kv, sees_until)
        h = self.post_attention_layernorm(a, residual=h)  # h + post_attention_layernorm(a)

        r = h
        m = self.mlp(self.pre_feedforward_layernorm(r))
        if self.moe:
            m = self._experts(r, self.post_feedforward_layernorm_1(m))  # m1 + m2
        h = self.post_feedforward_layernorm(m, residual=r)  # r + post_feedforward_layernorm(m)

        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h

    def _experts(self, r: torch.Tensor, m1: torch.Tensor) -> torch.Tensor:
        """The MoE block: m1 (the dense MLP's output after its own norm) + m2 (the routed experts' sum, normed)."""
        flat = r.reshape(-1, r.shape[-1])
        weights, experts = self.router(flat)  # routed on the residual, not the normed input
        y = self.experts(self.pre_feedforward_layernorm_2(flat), experts, weights).view_as(r)
        return self.post_feedforward_layernorm_2(y, residual=m1)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Given its (empty) weight, nn.Embedding skips its random init: under the meta device that init
        # imports torch's compiler stack (~2 s of every load).
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size,
                                      _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embedding's, float or quantised)."""
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch: int = 1, capacity: int = 256, tail: int = 0, kv_dtype: str = "float") -> KVCache:
        return KVCache(self.config, batch, capacity, self.dtype, self.device, tail=tail, kv_dtype=kv_dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                embeds: torch.Tensor | None = None, embeds_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions: [B, T] (position -1 marks left padding). Returns final-normed hidden states.

        embeds [B, T, hidden] replace the token embeddings where embeds_mask [B, T] is set: image soft
        tokens, already in the model's space (not scaled). With use_bidirectional_attention "vision",
        each run of image or video soft tokens attends to itself both ways on sliding layers (audio runs
        stay causal); a call must hold whole runs.
        """
        sees = [None] * len(self.layers)  # per layer: how far a query sees (attention_mask's sees_until)
        if embeds_mask is not None:
            if self.config.use_bidirectional_attention == "vision":
                sees = self._vision_sees(positions, self._vision_runs(ids, embeds_mask))
            ids = ids.masked_fill(embeds_mask, 0)  # soft-token ids need no embedding row
        # The scale is rounded to the weight dtype first, as the reference does.
        h = self.embed_tokens(ids) * torch.tensor(self.config.embed_scale, dtype=self.dtype)
        if embeds_mask is not None:
            h = torch.where(embeds_mask[..., None], embeds.to(h.dtype), h)
        for layer, kv, sees_until in zip(self.layers, cache.layers, sees):
            h = layer(h, positions, kv, sees_until)
        return self.norm(h)

    def _vision_sees(self, positions: torch.Tensor, runs: torch.Tensor) -> list:
        """Gemma 4: a run's tokens see to its end on sliding layers (the window still applies); the unified
        model: they see the whole run on every layer, across the window ((from, until) on sliding layers)."""
        starts, ends = run_bounds(positions, runs)
        if self.config.bidirectional_vision_layers == "all":
            span = torch.stack([starts, ends], dim=-1)
            return [span if self.config.is_sliding(i) else ends for i in range(len(self.layers))]
        return [ends if self.config.is_sliding(i) else None for i in range(len(self.layers))]

    def _vision_runs(self, ids: torch.Tensor, embeds_mask: torch.Tensor) -> torch.Tensor:
        """The soft tokens that attend both ways: images' and videos' (by their ids), not audio's."""
        vision_ids = self.config.vision_soft_token_ids
        if not vision_ids:
            return embeds_mask
        return embeds_mask & torch.isin(ids, torch.tensor(vision_ids, device=ids.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits, soft-capped: cap * tanh(logits / cap)."""
        head = self.lm_head if self.lm_head is not None else self.embed_tokens.linear  # tied: hidden @ embed^T
        logits = head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:  # in place: a vocabulary-wide temporary per op costs more than the op
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits


def run_bounds(positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T], [B, T]): for a position inside a run of set mask entries, the positions of the run's first
    and last entries; elsewhere the position itself, twice."""
    t = mask.shape[1]
    index = torch.arange(t, device=mask.device).expand_as(mask)
    none = torch.zeros_like(mask[:, :1])
    is_last = mask & ~torch.cat([mask[:, 1:], none], dim=1)
    is_first = mask & ~torch.cat([none, mask[:, :-1]], dim=1)
    nearest_last = torch.where(is_last, index, t).flip(1).cummin(1).values.flip(1)
    nearest_first = torch.where(is_first, index, -1).cummax(1).values
    return (positions.gather(1, torch.where(mask, nearest_first, index)),
            positions.gather(1, torch.where(mask, nearest_last, index)))

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
from ..config.text import ModelConfig
from ..quant.modules import Embedding, Linear
from .attention import Attention
from .layers import GatedMLP, RMSNorm, gelu_tanh_mul
from .moe import Experts, Router


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = GatedMLP(h, config.intermediate_size_of(layer))
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
        self.per_layer = p = config.hidden_size_per_layer_input
        if p:
            self.per_layer_input_gate = Linear(h, p, bias=False)
            self.per_layer_projection = Linear(p, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)
        if config.use_layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, h: torch.Tensor, qpos: torch.Tensor, kv, sees_until: torch.Tensor | None = None,
                per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        x = self.input_layernorm(h)
        a = self.self_attn(x, qpos, kv, sees_until)
        h = self.post_attention_layernorm(a, residual=h)  # h + post_attention_layernorm(a)

        r = h
        m = self.mlp(self.pre_feedforward_layernorm(r))
        if self.moe:
            m = self._experts(r, self.post_feedforward_layernorm_1(m))  # m1 + m2
        h = self.post_feedforward_layernorm(m, residual=r)  # r + post_feedforward_layernorm(m)
        return self.finish(h, per_layer_input)

    def finish(self, h: torch.Tensor, per_layer_input: torch.Tensor | None) -> torch.Tensor:
        """After the feed-forward: the per-layer input's residual (E2B/E4B), then the layer scalar."""
        if self.per_layer:
            g = self.per_layer_projection(gelu_tanh_mul(self.per_layer_input_gate(h), per_layer_input))
            h = self.post_per_layer_input_norm(g, residual=h)  # h + post_per_layer_input_norm(g)
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
        for i, layer in enumerate(self.layers):
            if config.kv_shared(i):
                layer.self_attn.read_keys_of(self.layers[config.kv_source_layer(i)].self_attn)
        if config.hidden_size_per_layer_input:
            width = config.per_layer_input_size
            self.embed_tokens_per_layer = Embedding(config.vocab_size_per_layer_input, width,
                                                    _weight=torch.empty(config.vocab_size_per_layer_input, width))
            self.per_layer_model_projection = Linear(config.hidden_size, width, bias=False)
            self.per_layer_projection_norm = RMSNorm(config.hidden_size_per_layer_input, config.rms_norm_eps)
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
        config = self.config
        sees = [None] * len(self.layers)  # per layer: how far a query sees (attention_mask's sees_until)
        if embeds_mask is not None:
            if config.use_bidirectional_attention == "vision":
                both_ways = embeds_mask  # image runs; audio runs attend causally, as the reference's mask says
                if config.audio_token_id is not None:
                    both_ways = embeds_mask & (ids != config.audio_token_id)
                sees = self._vision_sees(positions, both_ways)
            ids = ids.masked_fill(embeds_mask, config.pad_token_id or 0)  # soft tokens take the pad token's rows
        # The scale is rounded to the weight dtype first, as the reference does.
        h = self.embed_tokens(ids) * torch.tensor(config.embed_scale, dtype=self.dtype)
        if embeds_mask is not None:
            h = torch.where(embeds_mask[..., None], embeds.to(h.dtype), h)
        per_layer = self.per_layer_inputs(ids, h) if config.hidden_size_per_layer_input else None
        kvs = list(cache.layers)
        for i, layer in enumerate(self.layers):
            kv = kvs[i]
            source = config.kv_source_layer(i)
            if source != i:  # the source's KV as it attended over it in this call
                kv = kvs[source]
            elif config.num_kv_shared_layers:
                kv = kvs[i] = _Remembered(kv)
            h = layer(h, positions, kv, sees[i],
                      None if per_layer is None else per_layer[:, :, i])
        return self.norm(h)

    def _vision_sees(self, positions: torch.Tensor, runs: torch.Tensor) -> list:
        """Gemma 4: a run's tokens see to its end on sliding layers (the window still applies); the unified
        model: they see the whole run on every layer, across the window ((from, until) on sliding layers)."""
        starts, ends = run_bounds(positions, runs)
        if self.config.bidirectional_vision_layers == "all":
            span = torch.stack([starts, ends], dim=-1)
            return [span if self.config.is_sliding(i) else ends for i in range(len(self.layers))]
        return [ends if self.config.is_sliding(i) else None for i in range(len(self.layers))]

    def per_layer_inputs(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """[B, T, layers, hidden_size_per_layer_input]: each layer's slice of the token's row of the
        per-layer table (scaled by sqrt of its width, in the weight dtype) and of the embeddings h
        projected (times hidden^-0.5) and normed, their sum times 2^-0.5."""
        config = self.config
        shape = (*ids.shape, config.num_hidden_layers, config.hidden_size_per_layer_input)
        table = self.embed_tokens_per_layer(ids) * torch.tensor(config.hidden_size_per_layer_input**0.5,
                                                                dtype=self.embed_tokens_per_layer.dtype)
        projected = self.per_layer_model_projection(h) * config.hidden_size**-0.5
        projected = self.per_layer_projection_norm(projected.reshape(shape))
        return (projected + table.reshape(shape).to(projected.dtype)) * 2.0**-0.5

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits, soft-capped: cap * tanh(logits / cap)."""
        head = self.lm_head if self.lm_head is not None else self.embed_tokens.linear  # tied: hidden @ embed^T
        logits = head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:  # in place: a vocabulary-wide temporary per op costs more than the op
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits


class _Remembered:
    """A KV-storing layer's cache view for one call, keeping what it handed attention: the KV-shared
    layers after it attend over the same pieces (they store nothing)."""

    def __init__(self, kv):
        self.kv, self.pieces = kv, None

    def update(self, k, v, pos, chunk=None):
        if k is None and v is None:  # a KV-shared layer reading
            return self.pieces
        self.pieces = self.kv.update(k, v, pos, chunk=chunk)
        return self.pieces


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

"""Attention of one decoder layer over its KV cache view (sliding ring or full)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..cache import LayerKV
from ..config import ModelConfig
from .layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


def attention_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None,
                   sees_until: torch.Tensor | None = None) -> torch.Tensor | None:
    """[B, 1, T, S] booleans (True: attend) from absolute positions; None when every pair may attend.

    A query at p sees keys p-window+1 .. p on sliding layers, 0 .. p on full ones. `sees_until` [B, T]
    moves the upper bound past p (an image's soft tokens see the whole image). Slots at -1 are
    empty. Padding queries (-1) would see nothing, which makes softmax NaN; they see everything
    instead, and their outputs are never used.
    """
    q = qpos[:, :, None]
    k = kpos[:, None, :]
    allowed = (k >= 0) & (k <= (q if sees_until is None else sees_until[:, :, None]))
    if window is not None:
        allowed &= k > q - window
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    if bool(allowed.all()):
        return None
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = d = config.head_dim_of(layer)
        self.kv_heads = kv = config.kv_heads_of(layer)
        self.heads = heads
        self.k_eq_v = config.k_eq_v(layer)
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.scale = config.attention_scale

        self.q_proj = nn.Linear(hidden, heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, kv * d, bias=False)
        self.v_proj = None if self.k_eq_v else nn.Linear(hidden, kv * d, bias=False)
        self.o_proj = nn.Linear(heads * d, hidden, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False) if config.use_v_norm else None
        if self.k_eq_v and self.v_norm is None:
            raise ValueError("attention_k_eq_v needs v_norm")
        self.register_buffer("inv_freq", rope_inv_freq(config.rope_of(layer), d), persistent=False)

    def forward(self, x: torch.Tensor, qpos: torch.Tensor, kv: LayerKV,
                sees_until: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, hidden]; qpos: [B, T] absolute positions (-1: padding); sees_until: see attention_mask."""
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(self.inv_freq, qpos.clamp(min=0), x.dtype)
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)), cos, sin)

        raw_k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        raw_v = raw_k if self.k_eq_v else self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_norm(raw_v) if self.v_norm is not None else raw_v

        if self.k_eq_v:
            # One stored tensor: k_norm(raw) == v_norm(raw) * k_norm.weight, so keys are rebuilt
            # from the cached values at their own positions.
            _, v_all, kpos = kv.update(None, v.transpose(1, 2), qpos)
            kcos, ksin = rope_cos_sin(self.inv_freq, kpos.clamp(min=0), x.dtype)
            k_all = apply_rope((v_all.transpose(1, 2) * self.k_norm.weight).to(x.dtype), kcos, ksin).transpose(1, 2)
        else:
            k = apply_rope(self.k_norm(raw_k), cos, sin)
            k_all, v_all, kpos = kv.update(k.transpose(1, 2), v.transpose(1, 2), qpos)

        mask = attention_mask(qpos, kpos, self.window, sees_until)
        q = q.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def cached_kv(self, kv: LayerKV, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rotated keys and the values row `row` of this layer's cache holds, [KV, S, D] each, and
        their positions [S] (-1: empty), as this layer attends over them (an assistant drafter reads them)."""
        k, v, pos = kv.read(row)
        if k is None:  # K=V: rebuilt as forward() does
            cos, sin = rope_cos_sin(self.inv_freq, pos.clamp(min=0)[None], v.dtype)
            k = apply_rope((v.transpose(0, 1)[None] * self.k_norm.weight).to(v.dtype), cos, sin)[0].transpose(0, 1)
        return k, v, pos

"""The Gemma 4 vision tower and the multimodal embedder: image patches -> soft tokens in the text
model's embedding space.

Reads top to bottom like the reference (transformers' Gemma4VisionModel + Gemma4MultimodalEmbedder):
patch embedding with a learned 2-D position table, encoder layers (RMS norms around attention and a
gated GELU MLP, 2-D rotary embedding, bidirectional attention), average pooling of k x k patches,
scaling by sqrt(hidden), optional standardisation, then a weightless RMS norm and a projection to the
text hidden size. One image is encoded at a time, unpadded, so no attention mask is needed.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config.vision import VisionConfig
from ..native import ops
from .layers import RMSNorm, gelu_tanh_mul

CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


class ClippableLinear(nn.Module):
    """A bias-free linear layer; with clipping on, its input and output are clamped to stored bounds."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.clipped = clipped
        if clipped:
            for name, value in zip(CLIP_BOUNDS, (-math.inf, math.inf, -math.inf, math.inf)):
                self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min.to(x.dtype), self.input_max.to(x.dtype))
        y = ops.bf16_linear(x, self.weight) if self.weight.dtype is torch.bfloat16 else None
        if y is None:
            y = F.linear(x, self.weight)
        if self.clipped:
            y = torch.clamp(y, self.output_min.to(y.dtype), self.output_max.to(y.dtype))
        return y


def rope_2d(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for patch positions [N, 2] (x, y): the first half of each head rotates by
    x, the second by y, each half in rotate-half form with frequencies theta^(-2i/(head_dim/2))."""
    half = head_dim // 2
    inv = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half)
    fx = positions[:, 0, None].float() * inv
    fy = positions[:, 1, None].float() * inv
    emb = torch.cat([fx, fx, fy, fy], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE applied separately to each half of the head (x: [N, heads, D], cos: [N, D])."""
    cos, sin = cos[:, None], sin[:, None]
    parts = []
    d = x.shape[-1] // 2
    for lo in (0, d):
        p, c, s = x[..., lo:lo + d], cos[..., lo:lo + d], sin[..., lo:lo + d]
        rotated = torch.cat([-p[..., d // 2:], p[..., :d // 2]], dim=-1)
        parts.append(p * c + rotated * s)
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, d, clip = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = ClippableLinear(h, self.heads * d, clip)
        self.k_proj = ClippableLinear(h, self.kv_heads * d, clip)
        self.v_proj = ClippableLinear(h, self.kv_heads * d, clip)
        self.o_proj = ClippableLinear(self.heads * d, h, clip)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = _rotate(self.q_norm(self.q_proj(x).view(n, self.heads, self.head_dim)), cos, sin)
        k = _rotate(self.k_norm(self.k_proj(x).view(n, self.kv_heads, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(n, self.kv_heads, self.head_dim))
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        # q and k are RMS-normed: the scores take no 1/sqrt(d)
        out = ops.engine_attention(q, k, v, scale=1.0)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(0, 1).reshape(n, self.heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, i, clip = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(h, i, clip)
        self.up_proj = ClippableLinear(h, i, clip)
        self.down_proj = ClippableLinear(i, h, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_mul(self.gate_proj(x), self.up_proj(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(
            torch.empty(2, config.position_embedding_size, config.hidden_size), requires_grad=False)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # pixels arrive in [0, 1]; the model wants [-1, 1]
        h = self.input_proj((2 * (patches - 0.5)).to(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return h + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionModel(nn.Module):
    """Vision tower + multimodal embedder. encode(patches, positions, grid) -> [soft tokens, text hidden]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))
        # the multimodal embedder: a weightless RMS norm, then the projection into the text model
        self.pre_projection_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.embedding_projection = ClippableLinear(config.hidden_size, config.text_hidden_size, clipped=False)

    @property
    def dtype(self) -> torch.dtype:
        """The tower's activations' dtype (its big matrices may be held in the matrix engine's bf16)."""
        return self.patch_embedder.input_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding_projection.weight.device

    @torch.inference_mode()
    def encode(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches [N, 3·p·p] in [0, 1], (row, column, channel) order within a patch; positions [N, 2]
        (x, y) on a grid whose sides are multiples of the pooling kernel. Returns [N / k², text hidden]."""
        cfg = self.config
        k = cfg.pooling_kernel_size
        patches = patches.to(self.device)
        positions = positions.to(self.device, torch.long)
        width, height = int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1
        if width * height != patches.shape[0] or width % k or height % k:
            raise ValueError(f"image patches: a {width}x{height} grid of {patches.shape[0]} patches cannot be pooled "
                             f"by {k}x{k}")
        with ops.prefill_products():  # an image's thousands of patches: many-row products
            h = self.patch_embedder(patches, positions)
            cos, sin = rope_2d(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
            for layer in self.layers:
                h = layer(h, cos, sin)

        # Average k x k neighbourhoods; soft tokens come out row by row (x fastest). Scaling by
        # sqrt(hidden) and standardising are done in float32, as the reference does.
        grid = torch.zeros(height, width, h.shape[-1], dtype=torch.float32, device=h.device)
        grid[positions[:, 1], positions[:, 0]] = h.float()
        pooled = F.avg_pool2d(grid.permute(2, 0, 1)[None], k)[0].flatten(1).T
        pooled = pooled * cfg.hidden_size**0.5
        if cfg.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        pooled = pooled.to(h.dtype)
        with ops.prefill_products():
            return self.embedding_projection(self.pre_projection_norm(pooled))


def clip_refusal(config):
    """A tower's refusal of clipping bounds in a checkpoint whose config does not clip (towers.load_checked)."""
    def refuse(name: str) -> str | None:
        if name.endswith(CLIP_BOUNDS) and not config.use_clipped_linears:
            return f"{name}: clipping bounds in the checkpoint, but use_clipped_linears is off"
        return None
    return refuse


def load_vision(checkpoint, dtype: torch.dtype, device: torch.device) -> VisionModel:
    """Build the tower from a vision checkpoint reader (checkpoint/vision.py), checking every name and shape."""
    from .towers import load_checked

    config = checkpoint.config
    with torch.device("meta"):
        model = VisionModel(config)
    # Where many-row products run on the matrix engine (a float32 tower on a CPU with AMX), the projections are
    # held in its bf16: half the memory, and no rounding of the weights per image.
    engine_dtype = torch.bfloat16 if dtype is torch.float32 and ops.float_products_on_engine(device) else None
    projections = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ClippableLinear)}

    def dtype_of(name: str) -> torch.dtype:
        # norms, clipping bounds and the standardisation stay float32: they are small and act in float32
        if name.endswith(("norm.weight", "std_bias", "std_scale", *CLIP_BOUNDS)):
            return torch.float32
        return (engine_dtype or dtype) if name in projections else dtype

    return load_checked(model, checkpoint, device, dtype_of, unexpected="vision tensor in checkpoint",
                        missing="vision checkpoint", refuse=clip_refusal(config))

"""The Gemma 4 audio tower and its multimodal embedder: log-mel frames -> soft tokens in the text model's
embedding space.

Reads top to bottom like the reference (transformers' Gemma4AudioModel + Gemma4MultimodalEmbedder), a
conformer after the Universal Speech Model:
- sub-sampling: two 3x3 stride-2 convolutions over (time, mel), each with a bias-free LayerNorm over
  channels and a ReLU (4 frames become one), then a linear map of (channels x mel) to the hidden size;
- each conformer layer: a half-step feed-forward, chunked local self-attention with relative positions,
  the light convolution (GLU, causal depthwise conv, norm, SiLU), a second half-step feed-forward, a norm;
  activations are clamped to +-gradient_clipping around the norms, and the linears clamp their inputs and
  outputs to stored bounds (clippable linears);
- an output projection (with bias), then the embedder: a weightless RMS norm and a projection to the text
  hidden size.

One clip is encoded at a time over its valid frames only: padding frames, which the reference masks out
of every attention and zeroes before each convolution, cannot change a valid frame's output (the
convolutions see zeros either way, the light convolution looks only back), so they are never built.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config.audio import AudioConfig
from .layers import RMSNorm
from .vision import CLIP_BOUNDS, ClippableLinear, clip_refusal

NORM_EPS = 1e-6  # the conformer's own norms take the reference's default eps, not the config's


def _clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    limit = min(limit, torch.finfo(x.dtype).max)
    return torch.clamp(x, -limit, limit)


class SubsampleLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [channels, time, mel] -> [out channels, time / 2, mel / 2]."""
        y = self.conv(x[None].to(self.conv.weight.dtype))[0]
        return F.relu(self.norm(y.permute(1, 2, 0)).permute(2, 0, 1))


class Subsample(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, config.rms_norm_eps)
        mel = config.feature_size
        for _ in range(2):
            mel = (mel - 1) // 2 + 1  # a 3-wide stride-2 convolution padded by 1
        self.input_proj_linear = nn.Linear(mel * c1, config.hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[frames, mel] -> [ceil(ceil(frames / 2) / 2), hidden]."""
        h = self.layer1(self.layer0(features[None]))
        channels, time, mel = h.shape
        return self.input_proj_linear(h.permute(1, 2, 0).reshape(time, mel * channels))


class FeedForward(nn.Module):
    """A half-step feed-forward: x + residual_weight * post_norm(ffw_2(silu(ffw_1(pre_norm(x)))))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        h, clip = config.hidden_size, config.use_clipped_linears
        self.pre_layer_norm = RMSNorm(h, NORM_EPS)
        self.ffw_layer_1 = ClippableLinear(h, 4 * h, clip)
        self.ffw_layer_2 = ClippableLinear(4 * h, h, clip)
        self.post_layer_norm = RMSNorm(h, NORM_EPS)
        self.limit, self.weight = config.gradient_clipping, config.residual_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(_clamp(x, self.limit)))))
        return x + self.post_layer_norm(_clamp(y, self.limit)) * self.weight


def relative_positions(config: AudioConfig) -> torch.Tensor:
    """[context // 2 + 1, hidden]: sinusoids (sin half, cos half) of the distances context // 2 .. 0."""
    n = config.hidden_size // 2
    context = config.attention_chunk_size + config.attention_context_left - 1 + config.attention_context_right
    inv = torch.exp(torch.arange(n, device="cpu") * -(math.log(10_000.0) / max(n - 1, 1)))
    t = torch.arange(context // 2, -1, -1, device="cpu")[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)


class ChunkedAttention(nn.Module):
    """Local self-attention in blocks of `chunk` queries, each over the keys from `context_left - 1` before
    its block to `context_right` after it, with Transformer-XL relative position logits, soft-capped."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        h, clip = config.hidden_size, config.use_clipped_linears
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.chunk = config.attention_chunk_size
        self.past, self.future = config.attention_context_left - 1, config.attention_context_right
        self.context = self.chunk + self.past + self.future
        self.cap, self.invalid = config.attention_logit_cap, config.attention_invalid_logits_value
        self.q_proj = ClippableLinear(h, h, clip)
        self.k_proj = ClippableLinear(h, h, clip)
        self.v_proj = ClippableLinear(h, h, clip)
        self.post = ClippableLinear(h, h, clip)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        # softplus(per_dim_scale) of the HF checkpoint, as llama.cpp's mmproj stores it
        self.dim_scale = nn.Parameter(torch.ones(self.head_dim), requires_grad=False)
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)

    def _windows(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """[T, H, D] -> [blocks, context, H, D]: each block's keys, zero past the ends."""
        x = F.pad(x, (0, 0, 0, 0, self.past, blocks * self.chunk - x.shape[0] + self.future))
        return x.unfold(0, self.context, self.chunk).permute(0, 3, 1, 2)

    def _allowed(self, t: int, blocks: int, device) -> torch.Tensor:
        """[blocks, chunk, context]: key in range, and 0 <= query - key < past or 0 < key - query < future."""
        query = torch.arange(blocks * self.chunk, device=device).view(blocks, self.chunk, 1)
        key = (torch.arange(blocks, device=device) * self.chunk - self.past).view(blocks, 1, 1) + \
            torch.arange(self.context, device=device).view(1, 1, -1)
        d = query - key
        band = ((d >= 0) & (d < self.past)) | ((d < 0) & (-d < self.future))
        return band & (key >= 0) & (key < t) & (query < t)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t, (hh, dd) = x.shape[0], (self.heads, self.head_dim)
        blocks = -(-t // self.chunk)
        q = self.q_proj(x).float().view(t, hh, dd) * self.q_scale * self.dim_scale.float()
        k = self.k_proj(x).float().view(t, hh, dd) * self.k_scale
        v = self.v_proj(x).float().view(t, hh, dd)
        q = F.pad(q, (0, 0, 0, 0, 0, blocks * self.chunk - t)).view(blocks, self.chunk, hh, dd)
        k, v = self._windows(k, blocks), self._windows(v, blocks)

        content = torch.einsum("bqhd,bkhd->hbqk", q, k)
        rel = self.relative_k_proj(positions.to(x.dtype)).float().view(-1, hh, dd)
        by_distance = torch.einsum("bqhd,phd->hbqp", q, rel)  # p: distances context//2 .. 0
        # Transformer-XL's shift: query i of a block takes entry (key j) = by_distance[j - i], zero outside
        shifted = F.pad(by_distance, (0, self.context + 1 - by_distance.shape[-1]))
        shifted = shifted.reshape(hh, blocks, -1)[..., :self.chunk * self.context]
        scores = content + shifted.reshape(hh, blocks, self.chunk, self.context)

        scores = torch.tanh(scores / self.cap) * self.cap
        scores = scores.masked_fill(~self._allowed(t, blocks, x.device), self.invalid)
        out = torch.einsum("hbqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
        return self.post(out.reshape(blocks * self.chunk, hh * dd)[:t].to(x.dtype))


class LightConv(nn.Module):
    """x + linear_end(silu(conv_norm(causal depthwise conv(glu(linear_start(pre_norm(x)))))))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        h, clip, eps = config.hidden_size, config.use_clipped_linears, config.rms_norm_eps
        self.pre_layer_norm = RMSNorm(h, eps)
        self.linear_start = ClippableLinear(h, 2 * h, clip)
        self.depthwise_conv1d = nn.Conv1d(h, h, config.conv_kernel_size, groups=h, bias=False)
        self.conv_norm = RMSNorm(h, eps)
        self.linear_end = ClippableLinear(h, h, clip)
        self.limit = config.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        kernel = self.depthwise_conv1d.weight
        y = F.conv1d(F.pad(y.T[None], (kernel.shape[-1] - 1, 0)), kernel, groups=kernel.shape[0])[0].T
        return x + self.linear_end(F.silu(self.conv_norm(_clamp(y, self.limit))))


class ConformerLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        h = config.hidden_size
        self.feed_forward1 = FeedForward(config)
        self.norm_pre_attn = RMSNorm(h, NORM_EPS)
        self.self_attn = ChunkedAttention(config)
        self.norm_post_attn = RMSNorm(h, NORM_EPS)
        self.lconv1d = LightConv(config)
        self.feed_forward2 = FeedForward(config)
        self.norm_out = RMSNorm(h, NORM_EPS)
        self.limit = config.gradient_clipping

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(_clamp(x, self.limit)), positions)
        x = x + self.norm_post_attn(_clamp(a, self.limit))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.limit))


class AudioModel(nn.Module):
    """Audio tower + multimodal embedder. encode(features) -> [soft tokens, text hidden]."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = Subsample(config)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_hidden_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)
        self.pre_projection_norm = RMSNorm(config.output_proj_dims, config.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(config.output_proj_dims, config.text_hidden_size, bias=False)
        self.register_buffer("positions", relative_positions(config), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding_projection.weight.device

    def tower(self, features: torch.Tensor) -> torch.Tensor:
        """[frames, mel] valid log-mel frames -> [soft tokens, output_proj_dims] (the reference's
        Gemma4AudioModel output at the valid positions)."""
        h = self.subsample_conv_projection(features.to(self.device, self.dtype))
        positions = self.positions.to(h.device)
        for layer in self.layers:
            h = layer(h, positions)
        return self.output_proj(h)

    @torch.inference_mode()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """[frames, mel] valid log-mel frames -> [ceil(frames / 4), text hidden] soft-token embeddings."""
        if features.dim() != 2 or features.shape[1] != self.config.feature_size or features.shape[0] == 0:
            raise ValueError(f"audio features: expected [frames, {self.config.feature_size}], got "
                             f"{list(features.shape)}")
        return self.embedding_projection(self.pre_projection_norm(self.tower(features)))


def load_audio_tower(checkpoint, dtype: torch.dtype, device: torch.device) -> AudioModel:
    """Build the tower from an audio checkpoint reader (checkpoint/audio.py), checking every name and shape."""
    from .towers import load_checked

    config = checkpoint.config
    with torch.device("meta"):
        model = AudioModel(config)

    def dtype_of(name: str) -> torch.dtype:
        # norms, scales and clipping bounds stay float32: they are small and act in float32
        return torch.float32 if name.endswith(("norm.weight", "dim_scale", *CLIP_BOUNDS)) else dtype

    load_checked(model, checkpoint, device, dtype_of, unexpected="audio tensor in checkpoint",
                 missing="audio checkpoint", refuse=clip_refusal(config))
    model.positions = relative_positions(config).to(device)  # a function of the config, not stored
    return model

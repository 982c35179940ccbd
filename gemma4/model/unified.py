"""The 12B unified model's encoder-free embedders: image patches and raw waveform frames -> soft tokens in
the text model's embedding space, as transformers' Gemma4UnifiedVisionEmbedder and
Gemma4UnifiedMultimodalEmbedder compute them.

Image: merged patch -> LayerNorm -> Linear -> LayerNorm -> + table[x, 0] + table[y, 1] -> LayerNorm -> embedder.
Audio: frame of raw samples -> embedder.
Embedder (the Gemma 4 one, as after the vision tower): weightless RMSNorm -> projection to the text width.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.unified import UnifiedVisionConfig, WaveformAudioConfig
from .layers import RMSNorm


class MultimodalEmbedder(nn.Module):
    def __init__(self, width: int, text_hidden_size: int, eps: float):
        super().__init__()
        self.pre_projection_norm = RMSNorm(width, eps, with_scale=False)
        self.embedding_projection = nn.Linear(width, text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.pre_projection_norm(x))


class UnifiedVisionEmbedder(nn.Module):
    def __init__(self, config: UnifiedVisionConfig):
        super().__init__()
        self.config = config
        patch, d, eps = 3 * config.model_patch_size**2, config.mm_embed_dim, config.layer_norm_eps
        self.patch_ln1 = nn.LayerNorm(patch, eps=eps)
        self.patch_dense = nn.Linear(patch, d)
        self.patch_ln2 = nn.LayerNorm(d, eps=eps)
        self.pos_embedding = nn.Parameter(torch.empty(config.mm_posemb_size, 2, d), requires_grad=False)
        self.pos_norm = nn.LayerNorm(d, eps=eps)
        self.embedder = MultimodalEmbedder(d, config.text_hidden_size, config.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_dense.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_dense.weight.device

    @torch.inference_mode()
    def encode(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches [N, 3·s·s] in [0, 1] (s = model_patch_size; (row, column, channel) order), positions
        [N, 2] (x, y) of each merged patch -> [N, text hidden]: one soft token per patch."""
        positions = positions.to(self.device, torch.long)
        if int(positions.max()) >= self.config.mm_posemb_size:
            raise ValueError(f"image: a patch at position {int(positions.max())} is past the position table of "
                             f"{self.config.mm_posemb_size}")
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(patches.to(self.device, self.dtype))))
        table = self.pos_embedding
        h = self.pos_norm(h + table[positions[:, 0], 0] + table[positions[:, 1], 1])
        return self.embedder(h)


class WaveformAudioEmbedder(nn.Module):
    def __init__(self, config: WaveformAudioConfig):
        super().__init__()
        self.config = config
        self.embedder = MultimodalEmbedder(config.audio_samples_per_token, config.text_hidden_size, config.rms_norm_eps)

    @property
    def device(self) -> torch.device:
        return self.embedder.embedding_projection.weight.device

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, audio_samples_per_token] float -> [N, text hidden]: one soft token per frame."""
        return self.embedder(frames.to(self.device))


def load_embedder(checkpoint, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An embedder built from its reader (checkpoint/unified.py), every name and shape checked."""
    from .towers import load_checked

    kind = UnifiedVisionEmbedder if isinstance(checkpoint.config, UnifiedVisionConfig) else WaveformAudioEmbedder
    with torch.device("meta"):
        model = kind(checkpoint.config)
    return load_checked(model, checkpoint, device, lambda name: dtype, unexpected=f"tensor of the {checkpoint.what}",
                        missing=checkpoint.what)

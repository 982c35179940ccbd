"""The numbers of the 12B unified model's media embedders (config.json model_type gemma4_unified).

The unified model has no vision tower and no audio tower: an image's merged pixel patches and an audio
clip's raw waveform frames are projected straight into the text model (transformers'
Gemma4UnifiedVisionEmbedder and Gemma4UnifiedMultimodalEmbedder). Its text decoder is a Gemma 4 one
(text_hf.py: GEMMA4_TEXT_DEFAULTS["gemma4_unified_text"]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelLoadError
from .vision import SUPPORTED_SOFT_TOKENS

WAVEFORM_SAMPLING_RATE = 16_000  # the feature extractor's: a soft token is 640 samples, 40 ms


@dataclass
class UnifiedVisionConfig:
    """Gemma4UnifiedVisionConfig: merged patches of (patch_size * pooling_kernel_size)^2 pixels ->
    LayerNorm -> Linear(mm_embed_dim) -> LayerNorm -> + 2-D position table -> LayerNorm -> weightless
    RMSNorm -> projection to the text hidden size."""

    patch_size: int
    pooling_kernel_size: int
    mm_embed_dim: int
    mm_posemb_size: int
    output_proj_dims: int  # the width the multimodal embedder takes (mm_embed_dim in every real config)
    text_hidden_size: int
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which the reference keeps
    max_soft_tokens: int = 280
    video_max_soft_tokens: int = 70

    @property
    def model_patch_size(self) -> int:
        """The side of a merged patch: one soft token."""
        return self.patch_size * self.pooling_kernel_size

    @property
    def preprocess_patch_size(self) -> int:
        """Patches as images.preprocess cuts them: merged ones, read row by row, are exactly the reference's
        k x k merge of small patches (same resize, same pixel order, positions divided by k)."""
        return self.model_patch_size

    preprocess_pooling = 1

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], text_hidden_size: int, processor: Mapping[str, Any] | None = None
                ) -> "UnifiedVisionConfig":
        model_type = raw.get("model_type", "gemma4_unified_vision")
        if model_type != "gemma4_unified_vision":
            raise ModelLoadError(f"vision_config.model_type: {model_type!r} in a gemma4_unified config "
                                 f"(expected gemma4_unified_vision)")
        processor = processor or {}
        mm_embed_dim = int(raw.get("mm_embed_dim", 3840))
        return cls(
            patch_size=int(raw.get("patch_size", 16)),
            pooling_kernel_size=int(raw.get("pooling_kernel_size", 3)),
            mm_embed_dim=mm_embed_dim,
            mm_posemb_size=int(raw.get("mm_posemb_size", 1120)),
            output_proj_dims=int(raw.get("output_proj_dims", mm_embed_dim)),
            text_hidden_size=int(text_hidden_size),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_soft_tokens=int((processor.get("image_processor") or {}).get("max_soft_tokens", 280)),
            video_max_soft_tokens=int((processor.get("video_processor") or {}).get("max_soft_tokens", 70)),
        ).validate()

    def validate(self) -> "UnifiedVisionConfig":
        if self.output_proj_dims != self.mm_embed_dim:
            raise ModelLoadError(f"vision_config.output_proj_dims: {self.output_proj_dims} differs from mm_embed_dim "
                                 f"{self.mm_embed_dim} (the embedder's norm would not fit)")
        for key in ("max_soft_tokens", "video_max_soft_tokens"):
            if getattr(self, key) not in SUPPORTED_SOFT_TOKENS:
                raise ModelLoadError(f"{key}: {getattr(self, key)} is not one of {SUPPORTED_SOFT_TOKENS}")
        return self

    def parameter_count(self) -> int:
        patch = 3 * self.model_patch_size**2
        d = self.mm_embed_dim
        return 2 * patch + patch * d + d + 2 * d + self.mm_posemb_size * 2 * d + 2 * d + d * self.text_hidden_size


@dataclass
class WaveformAudioConfig:
    """Gemma4UnifiedAudioConfig: each soft token a frame of audio_samples_per_token raw samples at 16 kHz,
    through a weightless RMSNorm and a projection to the text hidden size."""

    audio_samples_per_token: int
    text_hidden_size: int
    rms_norm_eps: float = 1e-6
    sampling_rate: int = WAVEFORM_SAMPLING_RATE

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], text_hidden_size: int) -> "WaveformAudioConfig":
        model_type = raw.get("model_type", "gemma4_unified_audio")
        if model_type != "gemma4_unified_audio":
            raise ModelLoadError(f"audio_config.model_type: {model_type!r} in a gemma4_unified config "
                                 f"(expected gemma4_unified_audio)")
        samples = int(raw.get("audio_embed_dim", 640))
        if samples <= 0:
            raise ModelLoadError(f"audio_config.audio_embed_dim: must be positive, got {samples}")
        return cls(samples, int(text_hidden_size), float(raw.get("rms_norm_eps", 1e-6)))

    def parameter_count(self) -> int:
        return self.audio_samples_per_token * self.text_hidden_size

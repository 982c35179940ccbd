"""AudioConfig: the Gemma 4 audio tower's numbers (a conformer over log-mel frames)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelLoadError


@dataclass
class AudioConfig:
    """Every number of the Gemma 4 audio tower (a conformer over log-mel frames) and its projection into
    the text model. Parsed from config.json's audio_config (here) or from an mmproj GGUF
    (checkpoint/audio.py)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    subsampling_conv_channels: tuple[int, int]
    output_proj_dims: int  # the tower's output width, which the multimodal embedder projects
    text_hidden_size: int
    conv_kernel_size: int = 5  # the light convolution's causal depthwise kernel
    residual_weight: float = 0.5  # each feed-forward half-step adds this fraction of its output
    attention_chunk_size: int = 12
    attention_context_left: int = 13  # a frame sees itself and the context_left - 2 frames before it
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    feature_size: int = 128  # mel bins per frame
    audio_seq_length: int = 750  # the processor's most soft tokens per clip (30 s at 40 ms each)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], text_hidden_size: int, processor: Mapping[str, Any] | None = None
                ) -> "AudioConfig":
        model_type = raw.get("model_type", "gemma4_audio")
        if model_type != "gemma4_audio":
            raise ModelLoadError(f"audio_config.model_type: unsupported {model_type!r} (expected gemma4_audio)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"audio_config.hidden_act: {act!r} is not supported (expected silu)")
        channels = tuple(int(c) for c in raw.get("subsampling_conv_channels", (128, 32)))
        processor = processor or {}
        features = processor.get("feature_extractor") or {}
        return cls(
            hidden_size=int(raw.get("hidden_size", 1024)),
            num_hidden_layers=int(raw.get("num_hidden_layers", 12)),
            num_attention_heads=int(raw.get("num_attention_heads", 8)),
            subsampling_conv_channels=channels,
            output_proj_dims=int(raw.get("output_proj_dims", 1536)),
            text_hidden_size=int(text_hidden_size),
            conv_kernel_size=int(raw.get("conv_kernel_size", 5)),
            residual_weight=float(raw.get("residual_weight", 0.5)),
            attention_chunk_size=int(raw.get("attention_chunk_size", 12)),
            attention_context_left=int(raw.get("attention_context_left", 13)),
            attention_context_right=int(raw.get("attention_context_right", 0)),
            attention_logit_cap=float(raw.get("attention_logit_cap", 50.0)),
            attention_invalid_logits_value=float(raw.get("attention_invalid_logits_value", -1e9)),
            use_clipped_linears=bool(raw.get("use_clipped_linears", True)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            gradient_clipping=float(raw.get("gradient_clipping", 1e10)),
            feature_size=int(features.get("feature_size", 128)),
            audio_seq_length=int(processor.get("audio_seq_length", 750)),
        ).validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> "AudioConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ModelLoadError(f"audio_config.num_attention_heads: {self.num_attention_heads} does not divide "
                                 f"hidden_size={self.hidden_size}")
        if len(self.subsampling_conv_channels) != 2:
            raise ModelLoadError(f"audio_config.subsampling_conv_channels: expected two channel counts, got "
                                 f"{list(self.subsampling_conv_channels)}")
        if self.feature_size % 4:
            raise ModelLoadError(f"feature_size: {self.feature_size} mel bins do not halve twice")
        if self.attention_chunk_size < 1 or self.attention_context_left < 1 or self.attention_context_right < 0:
            raise ModelLoadError("audio_config: attention_chunk_size and attention_context_left must be positive")
        return self

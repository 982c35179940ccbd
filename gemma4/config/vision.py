"""VisionConfig: the Gemma 4 vision tower's numbers, and the soft-token budgets an image may take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelLoadError
from .common import SUPPORTED_ACTIVATION

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


@dataclass
class VisionConfig:
    """Every number of the Gemma 4 vision tower and its projection into the text model.

    Parsed from config.json's vision_config (here) or from an mmproj GGUF (checkpoint/vision.py).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    text_hidden_size: int  # the width the multimodal embedder projects to
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    standardize: bool = False  # (features - std_bias) * std_scale after pooling
    use_clipped_linears: bool = False  # every linear clamps its input and output to stored bounds
    max_soft_tokens: int = 280  # the image processor's default budget per image
    video_max_soft_tokens: int = 70  # the video processor's default budget per frame

    @property
    def preprocess_patch_size(self) -> int:
        """The patch side images.preprocess cuts (and preprocess_pooling: k, soft tokens = patches / k^2)."""
        return self.patch_size

    @property
    def preprocess_pooling(self) -> int:
        return self.pooling_kernel_size

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], text_hidden_size: int, processor: Mapping[str, Any] | None = None
                ) -> "VisionConfig":
        """From config.json's vision_config; `processor` is processor_config.json (its image_processor and
        video_processor budgets), when the folder has one."""
        model_type = raw.get("model_type", "gemma4_vision")
        if model_type != "gemma4_vision":
            raise ModelLoadError(f"vision_config.model_type: unsupported {model_type!r} (expected gemma4_vision)")
        act = raw.get("hidden_activation") or raw.get("hidden_act") or SUPPORTED_ACTIVATION
        if act != SUPPORTED_ACTIVATION:
            raise ModelLoadError(f"vision_config.hidden_activation: {act!r} is not supported")
        if raw.get("attention_bias"):
            raise ModelLoadError("vision_config.attention_bias: attention biases are not supported")
        rope = dict(raw.get("rope_parameters") or {})
        if rope.get("rope_type", "axial") != "axial":
            raise ModelLoadError(f"vision_config.rope_parameters: rope_type {rope['rope_type']!r} is not supported")
        hidden = int(raw.get("hidden_size", 768))
        heads = int(raw.get("num_attention_heads", 12))
        processor = processor or {}
        image_proc = processor.get("image_processor") or {}
        video_proc = processor.get("video_processor") or {}
        return cls(
            hidden_size=hidden,
            intermediate_size=int(raw.get("intermediate_size", 3072)),
            num_hidden_layers=int(raw.get("num_hidden_layers", 16)),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            patch_size=int(raw.get("patch_size", 16)),
            pooling_kernel_size=int(raw.get("pooling_kernel_size", 3)),
            position_embedding_size=int(raw.get("position_embedding_size", 10 * 1024)),
            text_hidden_size=int(text_hidden_size),
            rope_theta=float(rope.get("rope_theta", 100.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            standardize=bool(raw.get("standardize", False)),
            use_clipped_linears=bool(raw.get("use_clipped_linears", False)),
            max_soft_tokens=int(image_proc.get("max_soft_tokens", 280)),
            video_max_soft_tokens=int(video_proc.get("max_soft_tokens", 70)),
        ).validate()

    def validate(self) -> "VisionConfig":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(f"vision_config.num_key_value_heads: {self.num_key_value_heads} does not divide "
                                 f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 4:
            raise ModelLoadError(f"vision_config.head_dim: {self.head_dim} is not a multiple of 4 (2-D RoPE)")
        for key in ("max_soft_tokens", "video_max_soft_tokens"):
            if getattr(self, key) not in SUPPORTED_SOFT_TOKENS:
                raise ModelLoadError(f"{key}: {getattr(self, key)} is not one of {SUPPORTED_SOFT_TOKENS}")
        return self

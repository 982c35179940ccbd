"""AssistantConfig: a Gemma 4 assistant (the MTP drafter) and the Gemma 4 decoder inside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelLoadError
from .text import ModelConfig

# assistant model_type -> the model_type of its decoder (text_config)
ASSISTANT_TEXT_TYPES = {"gemma4_assistant": "gemma4_text", "gemma4_unified_assistant": "gemma4_unified_text"}


@dataclass
class AssistantConfig:
    """A Gemma 4 assistant: a small decoder whose layers read a target's KV (none of their own), fed the
    target's token embedding and final hidden state, with an optional centroid-masked output head."""

    text: ModelConfig
    backbone_hidden_size: int  # the target's hidden_size
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> "AssistantConfig":
        """From an assistant's config.json (model_type gemma4_assistant or gemma4_unified_assistant, its
        decoder in text_config)."""
        model_type = raw.get("model_type")
        if model_type not in ASSISTANT_TEXT_TYPES:
            raise ModelLoadError(f"model_type: {model_type!r} is not a Gemma 4 assistant "
                                 f"({' or '.join(ASSISTANT_TEXT_TYPES)})")
        text = raw.get("text_config")
        if not isinstance(text, Mapping):
            raise ModelLoadError(f"text_config: missing in a {model_type} config.json")
        text = dict(text, model_type=ASSISTANT_TEXT_TYPES[model_type])
        shared = text.pop("num_kv_shared_layers", None)
        if shared not in (None, 0, text.get("num_hidden_layers")):
            raise ModelLoadError(f"text_config.num_kv_shared_layers: an assistant shares every layer's KV (got {shared})")
        if text.get("enable_moe_block"):
            raise ModelLoadError("text_config.enable_moe_block: an assistant has no MoE block")
        if text.get("use_double_wide_mlp"):
            raise ModelLoadError("text_config.use_double_wide_mlp: not supported")
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        if raw.get("backbone_hidden_size") is None:
            raise ModelLoadError("backbone_hidden_size: missing from config.json")
        return cls(text=ModelConfig.from_hf(text), backbone_hidden_size=int(raw["backbone_hidden_size"]),
                   use_ordered_embeddings=bool(raw.get("use_ordered_embeddings", False)),
                   num_centroids=int(raw.get("num_centroids", 2048)),
                   centroid_intermediate_top_k=int(raw.get("centroid_intermediate_top_k", 32))).validate()

    def validate(self) -> "AssistantConfig":
        if self.use_ordered_embeddings:
            if self.num_centroids <= 0 or self.text.vocab_size % self.num_centroids:
                raise ModelLoadError(f"num_centroids: {self.num_centroids} does not divide vocab_size "
                                     f"{self.text.vocab_size}")
            if not 0 < self.centroid_intermediate_top_k <= self.num_centroids:
                raise ModelLoadError(f"centroid_intermediate_top_k: need 1 .. {self.num_centroids}, got "
                                     f"{self.centroid_intermediate_top_k}")
        return self

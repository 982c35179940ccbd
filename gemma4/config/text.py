"""ModelConfig: every architectural number of a Gemma 3 / Gemma 4 text decoder.

Built from an HF config.json (text_hf.py reads it into these fields) or from GGUF metadata
(checkpoint/gguf.py turns it into config.json fields first). Facts derived per layer (is it sliding, its
head_dim, its KV heads, its RoPE) are methods here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ModelLoadError
from .common import FULL, SLIDING, RopeSpec
from .text_hf import text_fields_from_hf


@dataclass
class ModelConfig:
    architecture: str  # "gemma4" or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    sliding_window: int
    rope: dict[str, RopeSpec]
    rms_norm_eps: float = 1e-6
    # layer index -> {"head_dim": int, "num_key_value_heads": int}: full layers of Gemma 4
    layer_overrides: dict[int, dict[str, int]] = field(default_factory=dict)
    attention_k_eq_v: bool = False
    attention_scale: float = 1.0  # Gemma 4: q and k are RMS-normed, so no 1/sqrt(d)
    use_v_norm: bool = True
    use_layer_scalar: bool = True
    final_logit_softcapping: float | None = None
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int | None = 0
    # "vision": each image's soft tokens attend to one another both ways on sliding layers
    use_bidirectional_attention: str | None = None
    # "sliding": image runs see one another on sliding layers, within the window (Gemma 4); "all": on every
    # layer, across the window (the unified model: its reference ORs the image blocks into every mask)
    bidirectional_vision_layers: str = "sliding"
    model_type: str = ""  # config.json's: gemma4, gemma4_unified, ... (what `gemma4 info` names)
    # Per-layer embeddings (E2B/E4B): a second table of vocab_size_per_layer_input rows, each row one
    # slice of hidden_size_per_layer_input values per layer; 0 when the model has none.
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    # The last num_kv_shared_layers layers read the KV of the last earlier layer of their type.
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False  # KV-shared layers' MLP is 2 x intermediate_size
    # the audio soft token: its runs stay causal under use_bidirectional_attention (set with an audio tower)
    audio_token_id: int | None = None

    # ---- derived, per layer -------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def head_dim_of(self, layer: int) -> int:
        return self.layer_overrides.get(layer, {}).get("head_dim", self.head_dim)

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_overrides.get(layer, {}).get("num_key_value_heads", self.num_key_value_heads)

    def k_eq_v(self, layer: int) -> bool:
        """Full layers with attention_k_eq_v have no v_proj: V is the raw k_proj output."""
        return self.attention_k_eq_v and not self.is_sliding(layer)

    def rope_of(self, layer: int) -> RopeSpec:
        return self.rope[self.layer_types[layer]]

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_shared(self, layer: int) -> bool:
        """A layer without K/V of its own: it attends over its kv_source_layer's."""
        return layer >= self.first_kv_shared_layer

    def kv_source_layer(self, layer: int) -> int:
        """The layer whose K/V `layer` attends over: itself, or for a KV-shared layer the last layer
        before the shared ones of the same type (sliding or full)."""
        if not self.kv_shared(layer):
            return layer
        kind = self.layer_types[layer]
        for i in range(self.first_kv_shared_layer - 1, -1, -1):
            if self.layer_types[i] == kind:
                return i
        raise ModelLoadError(f"num_kv_shared_layers: layer {layer} ({kind}) has no earlier {kind} layer to share KV with")

    def intermediate_size_of(self, layer: int) -> int:
        """The dense MLP's width in `layer`: doubled on KV-shared layers under use_double_wide_mlp."""
        return self.intermediate_size * (2 if self.use_double_wide_mlp and self.kv_shared(layer) else 1)

    @property
    def per_layer_input_size(self) -> int:
        """Columns of the per-layer embedding table: every layer's slice side by side."""
        return self.num_hidden_layers * self.hidden_size_per_layer_input

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # ---- sizes ------------------------------------------------------------------------
    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters of the text decoder, embedding counted once. The
        per-layer embedding table counts in the total only: a token reads one row of it (its
        projection and norms are active)."""
        h, p = self.hidden_size, self.hidden_size_per_layer_input
        total = active = self.vocab_size * h + h
        if p:
            total += self.vocab_size_per_layer_input * self.per_layer_input_size
            ple = h * self.per_layer_input_size + p
            total += ple
            active += ple
        for i in range(self.num_hidden_layers):
            d, kv, q = self.head_dim_of(i), self.kv_heads_of(i), self.num_attention_heads
            own_kv = 0 if self.kv_shared(i) else h * kv * d * (1 if self.k_eq_v(i) else 2) + d
            attn = h * q * d * 2 + own_kv + d
            dense = 3 * h * self.intermediate_size_of(i) + 4 * h
            layer = attn + dense + (2 * h * p + h if p else 0)
            total += layer
            active += layer
            if self.enable_moe_block:
                per_expert = 3 * h * self.moe_intermediate_size
                router = h * self.num_experts + h + self.num_experts + 3 * h
                total += router + self.num_experts * per_expert
                active += router + self.top_k_experts * per_expert
        return total, active

    # ---- parsing ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> "ModelConfig":
        """From a config.json dict: Gemma4ForConditionalGeneration (text_config inside),
        Gemma4ForCausalLM, and their Gemma 3 counterparts."""
        return cls(**text_fields_from_hf(raw)).validate()

    def validate(self) -> "ModelConfig":
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(
                f"layer_types: {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}"
            )
        for t in set(self.layer_types):
            if t not in (SLIDING, FULL):
                raise ModelLoadError(f"layer_types: unknown layer type {t!r}")
            if t not in self.rope:
                raise ModelLoadError(f"rope_parameters: no entry for {t}")
        for i in range(self.num_hidden_layers):
            if self.num_attention_heads % self.kv_heads_of(i):
                raise ModelLoadError(
                    f"num_key_value_heads: {self.kv_heads_of(i)} does not divide num_attention_heads="
                    f"{self.num_attention_heads} (layer {i})"
                )
        if self.enable_moe_block and not (0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0):
            raise ModelLoadError(
                f"top_k_experts: need 0 < top_k_experts <= num_experts and moe_intermediate_size > 0 "
                f"(got {self.top_k_experts}, {self.num_experts}, {self.moe_intermediate_size})"
            )
        if self.sliding_window <= 0 and SLIDING in self.layer_types:
            raise ModelLoadError(f"sliding_window: must be positive, got {self.sliding_window}")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ModelLoadError(f"num_kv_shared_layers: need 0 .. {self.num_hidden_layers - 1}, got "
                                 f"{self.num_kv_shared_layers}")
        for i in range(self.first_kv_shared_layer, self.num_hidden_layers):
            self.kv_source_layer(i)  # raises where a shared layer has no source
        if self.hidden_size_per_layer_input < 0 or (self.hidden_size_per_layer_input
                                                    and self.vocab_size_per_layer_input <= 0):
            raise ModelLoadError(f"hidden_size_per_layer_input: need a positive vocab_size_per_layer_input "
                                 f"(got {self.hidden_size_per_layer_input}, {self.vocab_size_per_layer_input})")
        return self

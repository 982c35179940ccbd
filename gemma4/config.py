"""ModelConfig: every architectural number of a Gemma 3 / Gemma 4 text decoder.

Parsed from an HF config.json (here) or from GGUF metadata (checkpoint/gguf.py builds the same
dataclass). Facts derived per layer (is it sliding, its head_dim, its KV heads, its RoPE) are methods
here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ModelLoadError

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ACTIVATION = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class RopeSpec:
    """Inverse frequencies theta^(-2i/d) for the first `partial_rotary_factor * d/2` pairs, zero for
    the rest, all divided by `factor` (linear scaling). Covers `default`, `linear` and `proportional`."""

    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


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
        model_type = raw.get("model_type")
        top_type = model_type
        if model_type in ("gemma4", "gemma4_unified", "gemma3"):
            text = raw.get("text_config")
            if not isinstance(text, Mapping):
                raise ModelLoadError(f"text_config: missing in a {model_type} config.json")
            text = dict(text)
            text.setdefault("model_type", model_type + "_text")
            for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id"):
                if key in raw and key not in text:
                    text[key] = raw[key]
            raw = text
            model_type = raw.get("model_type")
        if model_type in GEMMA4_TEXT_DEFAULTS:
            config = _gemma4_from_hf(raw, GEMMA4_TEXT_DEFAULTS[model_type])
        elif model_type == "gemma3_text":
            config = _gemma3_from_hf(raw)
        else:
            raise ModelLoadError(f"model_type: unsupported value {model_type!r} (expected gemma4, gemma4_unified, "
                                 f"gemma4_text, gemma4_unified_text, gemma3 or gemma3_text)")
        config.model_type = top_type
        config.bidirectional_vision_layers = BIDIRECTIONAL_VISION_LAYERS.get(model_type, "sliding")
        return config

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


def _require(raw: Mapping[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ModelLoadError(f"{key}: missing from config.json")
    return raw[key]


def _refuse(raw: Mapping[str, Any], key: str, ok: Any, what: str) -> None:
    value = raw.get(key)
    if value not in (None, ok) and value != ok:
        raise ModelLoadError(f"{key}: {what} are not supported (got {value!r})")


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _layer_types(raw: Mapping[str, Any], pattern_default: int) -> list[str]:
    n = int(_require(raw, "num_hidden_layers"))
    types = raw.get("layer_types")
    if types is None:
        pattern = int(raw.get("sliding_window_pattern") or pattern_default)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    return list(types)


def _rope_spec(params: Mapping[str, Any] | None, theta_default: float, where: str) -> RopeSpec:
    params = dict(params or {})
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "proportional"):
        raise ModelLoadError(f"rope_parameters: {where} rope_type {kind!r} is not supported")
    return RopeSpec(
        theta=float(params.get("rope_theta", theta_default)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0,
        factor=float(params.get("factor", 1.0)),
    )


def _common(raw: Mapping[str, Any]) -> dict[str, Any]:
    act = raw.get("hidden_activation") or raw.get("hidden_act") or SUPPORTED_ACTIVATION
    if act != SUPPORTED_ACTIVATION:
        raise ModelLoadError(f"hidden_activation: {act!r} is not supported (expected {SUPPORTED_ACTIVATION})")
    if raw.get("attention_bias"):
        raise ModelLoadError("attention_bias: attention biases are not supported")
    heads = int(_require(raw, "num_attention_heads"))
    hidden = int(_require(raw, "hidden_size"))
    return dict(
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_hidden_layers=int(_require(raw, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=raw.get("final_logit_softcapping"),
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        bos_token_id=raw.get("bos_token_id", 2),
        eos_token_ids=_eos_list(raw.get("eos_token_id", 1)),
        pad_token_id=raw.get("pad_token_id", 0),
    )


# The text decoders of the Gemma 4 family differ only in these defaults (transformers' Gemma4TextConfig and
# Gemma4UnifiedTextConfig); a config.json that spells a field out wins.
GEMMA4_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma4_text": dict(sliding_window=512, use_bidirectional_attention=None, max_position_embeddings=131_072),
    "gemma4_unified_text": dict(sliding_window=1024, use_bidirectional_attention="vision",
                                max_position_embeddings=262_144),
}
# ... and in how far image runs attend both ways (no config.json field: the reference's mask code differs)
BIDIRECTIONAL_VISION_LAYERS = {"gemma4_text": "sliding", "gemma4_unified_text": "all"}


def _gemma4_from_hf(raw: Mapping[str, Any], defaults: Mapping[str, Any] = GEMMA4_TEXT_DEFAULTS["gemma4_text"]
                    ) -> ModelConfig:
    raw = {**defaults, **raw}  # (an explicit null stays: use_bidirectional_attention null is causal)
    _refuse(raw, "use_bidirectional_attention", "vision", "bidirectional text attention (embedding models)")
    common = _common(raw)
    layer_types = _layer_types(raw, 6)
    if layer_types and layer_types[-1] != FULL:
        layer_types[-1] = FULL  # the reference forces the last layer to full attention
    k_eq_v = bool(raw.get("attention_k_eq_v", False))

    # Full layers take their own head_dim and KV heads. The HF config spells this two ways: the
    # published configs carry global_head_dim / num_global_key_value_heads, transformers' own saves a
    # per_layer_config of overrides. As in the reference, the global KV head count applies only with K=V.
    overrides: dict[int, dict[str, int]] = {}
    if raw.get("per_layer_config"):
        for key, values in raw["per_layer_config"].items():
            unknown = set(values) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ModelLoadError(f"per_layer_config: unsupported override {sorted(unknown)[0]!r}")
            overrides[int(key)] = {k: int(v) for k, v in values.items()}
    else:
        full = {"head_dim": int(raw.get("global_head_dim") or 512)}
        if k_eq_v and raw.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = int(raw["num_global_key_value_heads"])
        overrides = {i: dict(full) for i, t in enumerate(layer_types) if t == FULL}

    rope_raw = raw.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    rope = {t: _rope_spec(rope_raw.get(t), 10_000.0 if t == SLIDING else 1_000_000.0, t) for t in (SLIDING, FULL)}

    moe = bool(raw.get("enable_moe_block", False))
    return ModelConfig(
        architecture="gemma4",
        layer_types=layer_types,
        sliding_window=int(raw.get("sliding_window") or defaults["sliding_window"]),
        rope=rope,
        layer_overrides=overrides,
        attention_k_eq_v=k_eq_v,
        attention_scale=1.0,
        use_v_norm=True,
        use_layer_scalar=True,
        enable_moe_block=moe,
        num_experts=int(raw.get("num_experts") or 0) if moe else 0,
        top_k_experts=int(raw.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0) if moe else 0,
        use_bidirectional_attention=raw.get("use_bidirectional_attention"),
        hidden_size_per_layer_input=int(raw.get("hidden_size_per_layer_input") or 0),
        vocab_size_per_layer_input=int(raw.get("vocab_size_per_layer_input") or common["vocab_size"]),
        num_kv_shared_layers=int(raw.get("num_kv_shared_layers") or 0),
        use_double_wide_mlp=bool(raw.get("use_double_wide_mlp", False)),
        **common,
    ).validate()


def _gemma3_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError("use_bidirectional_attention: bidirectional attention is not supported")
    common = _common(raw)
    rope_raw = dict(raw.get("rope_parameters") or {})
    if not rope_raw:  # older configs: rope_theta, rope_local_base_freq, rope_scaling (global layers)
        rope_raw = {
            FULL: {"rope_theta": raw.get("rope_theta", 1_000_000.0), **(raw.get("rope_scaling") or {})},
            SLIDING: {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)},
        }
    rope = {
        FULL: _rope_spec(rope_raw.get(FULL), 1_000_000.0, FULL),
        SLIDING: _rope_spec(rope_raw.get(SLIDING), 10_000.0, SLIDING),
    }
    return ModelConfig(
        architecture="gemma3",
        layer_types=_layer_types(raw, 6),
        sliding_window=int(raw.get("sliding_window") or 4096),
        rope=rope,
        attention_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        use_v_norm=False,
        use_layer_scalar=False,
        **common,
    ).validate()


# ---- the assistant (MTP drafter) ---------------------------------------------------------------

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


# ---- the vision tower -------------------------------------------------------------------------

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


@dataclass
class VisionConfig:
    """Every number of the Gemma 4 vision tower and its projection into the text model.

    Parsed from config.json's vision_config (here) or from an mmproj GGUF (checkpoint/mmproj.py).
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


# ---- the audio tower --------------------------------------------------------------------------

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

"""config.json -> the fields of a text decoder's ModelConfig (text.py builds and validates it).

Gemma4ForConditionalGeneration and Gemma 3's carry the decoder in text_config; Gemma4ForCausalLM and
Gemma 3's text-only models carry it at the top. The Gemma 4 family's text decoders differ only in the
defaults below; everything else a config.json leaves out takes the reference's default here.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ModelLoadError
from .common import FULL, SLIDING, SUPPORTED_ACTIVATION, RopeSpec

# The text decoders of the Gemma 4 family differ only in these defaults (transformers' Gemma4TextConfig and
# Gemma4UnifiedTextConfig); a config.json that spells a field out wins.
GEMMA4_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma4_text": dict(sliding_window=512, use_bidirectional_attention=None, max_position_embeddings=131_072),
    "gemma4_unified_text": dict(sliding_window=1024, use_bidirectional_attention="vision",
                                max_position_embeddings=262_144),
}
# ... and in how far image runs attend both ways (no config.json field: the reference's mask code differs)
BIDIRECTIONAL_VISION_LAYERS = {"gemma4_text": "sliding", "gemma4_unified_text": "all"}


def text_fields_from_hf(raw: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig's keyword arguments from a config.json dict (its text_config, where it has one)."""
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
        fields = _gemma4_fields(raw, GEMMA4_TEXT_DEFAULTS[model_type])
    elif model_type == "gemma3_text":
        fields = _gemma3_fields(raw)
    else:
        raise ModelLoadError(f"model_type: unsupported value {model_type!r} (expected gemma4, gemma4_unified, "
                             f"gemma4_text, gemma4_unified_text, gemma3 or gemma3_text)")
    fields["model_type"] = top_type
    fields["bidirectional_vision_layers"] = BIDIRECTIONAL_VISION_LAYERS.get(model_type, "sliding")
    return fields


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



def _gemma4_fields(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
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
    return dict(
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
    )


def _gemma3_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
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
    return dict(
        architecture="gemma3",
        layer_types=_layer_types(raw, 6),
        sliding_window=int(raw.get("sliding_window") or 4096),
        rope=rope,
        attention_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        use_v_norm=False,
        use_layer_scalar=False,
        **common,
    )


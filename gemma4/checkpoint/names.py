"""The one table of tensor names: ours (the HF text-model names without prefix) and llama.cpp's GGUF.

`{i}` stands for the layer index. Loaders and converters read this table and nothing else.
"""

from __future__ import annotations

import re

# HF layouts put the text model under one of these prefixes (multimodal first).
HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")

# Norm weights: Gemma 3 HF checkpoints store w for a norm that multiplies by (1 + w).
NORM_SUFFIXES = ("norm.weight",)

# (our name, GGUF name)
TENSORS: list[tuple[str, str]] = [
    ("embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
    ("layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
    ("layers.{i}.layer_scalar", "blk.{i}.layer_output_scale.weight"),
    ("layers.{i}.router.proj.weight", "blk.{i}.ffn_gate_inp.weight"),
    ("layers.{i}.router.scale", "blk.{i}.ffn_gate_inp.scale"),
    ("layers.{i}.router.per_expert_scale", "blk.{i}.ffn_down_exps.scale"),
    ("layers.{i}.experts.gate_up_proj", "blk.{i}.ffn_gate_up_exps.weight"),
    ("layers.{i}.experts.down_proj", "blk.{i}.ffn_down_exps.weight"),
    ("layers.{i}.pre_feedforward_layernorm_2.weight", "blk.{i}.pre_ffw_norm_2.weight"),
    ("layers.{i}.post_feedforward_layernorm_1.weight", "blk.{i}.post_ffw_norm_1.weight"),
    ("layers.{i}.post_feedforward_layernorm_2.weight", "blk.{i}.post_ffw_norm_2.weight"),
    # per-layer embeddings (E2B/E4B), named as llama.cpp names gemma3n's
    ("embed_tokens_per_layer.weight", "per_layer_token_embd.weight"),
    ("per_layer_model_projection.weight", "per_layer_model_proj.weight"),
    ("per_layer_projection_norm.weight", "per_layer_proj_norm.weight"),
    ("layers.{i}.per_layer_input_gate.weight", "blk.{i}.inp_gate.weight"),
    ("layers.{i}.per_layer_projection.weight", "blk.{i}.proj.weight"),
    ("layers.{i}.post_per_layer_input_norm.weight", "blk.{i}.post_norm.weight"),
    # the Gemma 4 assistant (llama.cpp arch gemma4-assistant); in its HF checkpoint these four sit at the
    # top level under these same names, its decoder under "model."
    ("pre_projection.weight", "nextn.pre_projection.weight"),
    ("post_projection.weight", "nextn.post_projection.weight"),
    ("masked_embedding.centroids.weight", "masked_embd_centroids.weight"),
    ("masked_embedding.token_ordering", "masked_embd_ordering"),
]

# Assistant tensors outside its decoder (a target checkpoint never has them).
ASSISTANT_TOP_LEVEL = ("pre_projection.weight", "post_projection.weight", "masked_embedding.centroids.weight",
                       "masked_embedding.token_ordering")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


class _Table:
    """(template, target) name pairs, their patterns compiled on first use: a text model's load never needs the
    vision and audio tables (~400 patterns, a noticeable part of the import)."""

    def __init__(self, pairs):
        self._pairs, self._compiled = list(pairs), None

    def translate(self, name: str) -> str | None:
        if self._compiled is None:
            self._compiled = [(_pattern(a), b) for a, b in self._pairs]
        for pattern, target in self._compiled:
            m = pattern.match(name)
            if m:
                return target.replace("{i}", m.group(1)) if m.groups() else target
        return None


_OURS = _Table((ours, gguf) for ours, gguf in TENSORS)
_GGUF = _Table((gguf, ours) for ours, gguf in TENSORS)


def _translate(name: str, table: _Table) -> str | None:
    return table.translate(name)


def to_gguf(ours: str) -> str | None:
    return _translate(ours, _OURS)


def from_gguf(gguf_name: str) -> str | None:
    return _translate(gguf_name, _GGUF)


def is_norm(ours: str) -> bool:
    return ours.endswith(NORM_SUFFIXES)


# ---- the vision tower and multimodal embedder ---------------------------------------------------
# (our name in model/vision.py, HF name in a Gemma4ForConditionalGeneration checkpoint, llama.cpp mmproj
# GGUF name as convert_hf_to_gguf.py --mmproj writes it for the gemma4v projector)
_VISION_LINEARS = [
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_out"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
]
_VISION_NORMS = [
    ("input_layernorm", "ln1"), ("post_attention_layernorm", "attn_post_norm"),
    ("pre_feedforward_layernorm", "ln2"), ("post_feedforward_layernorm", "ffn_post_norm"),
    ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
]
HF_VISION_PREFIX = "model.vision_tower."
HF_VISION_EMBEDDER_PREFIX = "model.embed_vision."

VISION_TENSORS: list[tuple[str, str, str]] = [
    ("patch_embedder.input_proj.weight", "model.vision_tower.patch_embedder.input_proj.weight", "v.patch_embd.weight"),
    ("patch_embedder.position_embedding_table", "model.vision_tower.patch_embedder.position_embedding_table",
     "v.position_embd.weight"),
    ("std_bias", "model.vision_tower.std_bias", "v.std_bias"),
    ("std_scale", "model.vision_tower.std_scale", "v.std_scale"),
    ("embedding_projection.weight", "model.embed_vision.embedding_projection.weight", "mm.input_projection.weight"),
    *[(f"layers.{{i}}.{ours}.weight", f"model.vision_tower.encoder.layers.{{i}}.{ours}.weight",
       f"v.blk.{{i}}.{gguf}.weight") for ours, gguf in _VISION_NORMS],
    *[(f"layers.{{i}}.{ours}.weight", f"model.vision_tower.encoder.layers.{{i}}.{ours}.linear.weight",
       f"v.blk.{{i}}.{gguf}.weight") for ours, gguf in _VISION_LINEARS],
    # the clipping bounds of Gemma4ClippableLinear (present when use_clipped_linears is on)
    *[(f"layers.{{i}}.{ours}.{bound}", f"model.vision_tower.encoder.layers.{{i}}.{ours}.{bound}",
       f"v.blk.{{i}}.{gguf}.{bound}")
      for ours, gguf in _VISION_LINEARS
      for bound in ("input_min", "input_max", "output_min", "output_max")],
]

_V_OURS_HF = _Table((o, h) for o, h, _ in VISION_TENSORS)
_V_HF = _Table((h, o) for o, h, _ in VISION_TENSORS)
_V_OURS_GGUF = _Table((o, g) for o, _, g in VISION_TENSORS)
_V_GGUF = _Table((g, o) for o, _, g in VISION_TENSORS)


def vision_from_hf(hf_name: str) -> str | None:
    return _translate(hf_name, _V_HF)


def vision_to_hf(ours: str) -> str | None:
    return _translate(ours, _V_OURS_HF)


def vision_from_gguf(gguf_name: str) -> str | None:
    return _translate(gguf_name, _V_GGUF)


def vision_to_gguf(ours: str) -> str | None:
    return _translate(ours, _V_OURS_GGUF)


# ---- the audio tower and its embedder -----------------------------------------------------------
# (our name in model/audio.py, HF name in a Gemma4ForConditionalGeneration checkpoint, llama.cpp mmproj
# GGUF name as convert_hf_to_gguf.py --mmproj writes it for the gemma4a projector)
HF_AUDIO_PREFIX = "model.audio_tower."
HF_AUDIO_EMBEDDER_PREFIX = "model.embed_audio."

_AUDIO_LINEARS = [  # clippable linears: HF spells the weight `<name>.linear.weight`
    ("feed_forward1.ffw_layer_1", "ffn_up"), ("feed_forward1.ffw_layer_2", "ffn_down"),
    ("feed_forward2.ffw_layer_1", "ffn_up_1"), ("feed_forward2.ffw_layer_2", "ffn_down_1"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.post", "attn_out"), ("lconv1d.linear_start", "conv_pw1"), ("lconv1d.linear_end", "conv_pw2"),
]
_AUDIO_LAYER_WEIGHTS = [
    ("feed_forward1.pre_layer_norm", "ffn_norm"), ("feed_forward1.post_layer_norm", "ffn_post_norm"),
    ("feed_forward2.pre_layer_norm", "ffn_norm_1"), ("feed_forward2.post_layer_norm", "ffn_post_norm_1"),
    ("norm_pre_attn", "attn_pre_norm"), ("norm_post_attn", "attn_post_norm"), ("norm_out", "ln2"),
    ("self_attn.relative_k_proj", "attn_k_rel"), ("lconv1d.depthwise_conv1d", "conv_dw"),
    # the converter's name map crosses these two; llama.cpp crosses them back when it loads
    ("lconv1d.pre_layer_norm", "conv_norm"), ("lconv1d.conv_norm", "norm_conv"),
]
# Ours holds softplus(per_dim_scale), the factor the attention multiplies by, as llama.cpp's mmproj does.
AUDIO_SOFTPLUS_FROM_HF = ("self_attn.dim_scale",)

AUDIO_TENSORS: list[tuple[str, str, str]] = [
    *[(f"subsample_conv_projection.layer{j}.{part}.weight",
       f"model.audio_tower.subsample_conv_projection.layer{j}.{part}.weight",
       f"a.conv1d.{j}.{'norm.weight' if part == 'norm' else 'weight'}") for j in (0, 1) for part in ("conv", "norm")],
    ("subsample_conv_projection.input_proj_linear.weight",
     "model.audio_tower.subsample_conv_projection.input_proj_linear.weight", "a.input_projection.weight"),
    ("output_proj.weight", "model.audio_tower.output_proj.weight", "a.pre_encode.out.weight"),
    ("output_proj.bias", "model.audio_tower.output_proj.bias", "a.pre_encode.out.bias"),
    ("embedding_projection.weight", "model.embed_audio.embedding_projection.weight", "mm.a.input_projection.weight"),
    ("layers.{i}.self_attn.dim_scale", "model.audio_tower.layers.{i}.self_attn.per_dim_scale",
     "a.blk.{i}.per_dim_scale.weight"),
    *[(f"layers.{{i}}.{ours}.weight", f"model.audio_tower.layers.{{i}}.{ours}.weight", f"a.blk.{{i}}.{gguf}.weight")
      for ours, gguf in _AUDIO_LAYER_WEIGHTS],
    *[(f"layers.{{i}}.{ours}.weight", f"model.audio_tower.layers.{{i}}.{ours}.linear.weight",
       f"a.blk.{{i}}.{gguf}.weight") for ours, gguf in _AUDIO_LINEARS],
    *[(f"layers.{{i}}.{ours}.{bound}", f"model.audio_tower.layers.{{i}}.{ours}.{bound}", f"a.blk.{{i}}.{gguf}.{bound}")
      for ours, gguf in _AUDIO_LINEARS for bound in ("input_min", "input_max", "output_min", "output_max")],
]

_A_HF = _Table((h, o) for o, h, _ in AUDIO_TENSORS)
_A_OURS_HF = _Table((o, h) for o, h, _ in AUDIO_TENSORS)
_A_GGUF = _Table((g, o) for o, _, g in AUDIO_TENSORS)


def audio_from_hf(hf_name: str) -> str | None:
    return _translate(hf_name, _A_HF)


def audio_to_hf(ours: str) -> str | None:
    return _translate(ours, _A_OURS_HF)


def audio_from_gguf(gguf_name: str) -> str | None:
    return _translate(gguf_name, _A_GGUF)


# ---- the unified model's (gemma4_unified) encoder-free embedders -----------------------------------
# (our name in model/unified.py, HF name in a Gemma4UnifiedForConditionalGeneration checkpoint). llama.cpp
# writes them into mmproj files of its own projector types (gemma4uv, gemma4ua): their names below.
# The HF names are those of the published checkpoints (transformers renames them on load:
# conversion_mapping.py "gemma4_unified"; its save_pretrained writes these back).
UNIFIED_VISION_TENSORS: list[tuple[str, str]] = [
    *[(f"{ln}.{p}", f"model.vision_embedder.{ln}.{p}") for ln in ("patch_ln1", "patch_ln2", "pos_norm", "patch_dense")
      for p in ("weight", "bias")],
    ("pos_embedding", "model.vision_embedder.pos_embedding"),
    ("embedder.embedding_projection.weight", "model.embed_vision.embedding_projection.weight"),
]
WAVEFORM_AUDIO_TENSORS: list[tuple[str, str]] = [
    ("embedder.embedding_projection.weight", "model.embed_audio.embedding_projection.weight"),
]


# our name -> llama.cpp's in an mmproj (convert_hf_to_gguf.py, Gemma4UnifiedVisionAudioModel: pos_norm becomes
# the third patch norm; tools/mtmd/clip.cpp loads them for PROJECTOR_TYPE_GEMMA4UV / GEMMA4UA)
UNIFIED_VISION_GGUF: dict[str, str] = {
    **{f"{ln}.{p}": f"v.patch_norm.{i}.{p}" for i, ln in ((1, "patch_ln1"), (2, "patch_ln2"), (3, "pos_norm"))
       for p in ("weight", "bias")},
    "patch_dense.weight": "v.patch_embd.weight", "patch_dense.bias": "v.patch_embd.bias",
    "pos_embedding": "v.position_embd.weight",
    "embedder.embedding_projection.weight": "mm.input_projection.weight",
}
WAVEFORM_AUDIO_GGUF: dict[str, str] = {"embedder.embedding_projection.weight": "mm.a.input_projection.weight"}


def unified_from_hf(hf_name: str, table: list[tuple[str, str]]) -> str | None:
    """Our name of an HF tensor of one of the unified embedder tables above, or None."""
    return next((ours for ours, hf in table if hf == hf_name), None)

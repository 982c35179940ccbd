"""Tiny random 12B-style unified models (transformers' Gemma4UnifiedForConditionalGeneration: Gemma 4 text
decoder, encoder-free image and waveform embedders) and their assistants, built at test time.

The reference's unified image processor needs torchvision, which the tests do without: its inputs are
made from the Gemma 4 PIL image processor's small patches merged by the reference's own `patches_merge`
(steps 5 and 6 of Gemma4UnifiedImageProcessor._preprocess), imported with torchvision stubbed out (the
function itself uses torch only).
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

from assistant_reference import _assistant_sharing, mark_shared_kv_producers
from reference import GEMMA4_CONFIGS, VOCAB, _randomize
from vision_reference import MAX_SOFT_TOKENS, TOKEN_IDS, write_media_tokenizer

AUDIO_TOKENS = ["<|audio>", "<audio|>"]  # after vision_reference's media tokens
UNIFIED_TOKEN_IDS = {**TOKEN_IDS, **{t: max(TOKEN_IDS.values()) + 1 + i for i, t in enumerate(AUDIO_TOKENS)}}

# The 12B's text decoder is dense with K=V full layers: "dense_kv" has that shape (window 7, 6 layers).
TEXT = "dense_kv"
VISION = dict(patch_size=4, pooling_kernel_size=3, mm_embed_dim=24, mm_posemb_size=40, output_proj_dims=24)
SAMPLES_PER_TOKEN = 16  # audio_embed_dim: 640 in the 12B (40 ms at 16 kHz)

ASSISTANT_TEXT = dict(hidden_size=32, intermediate_size=40, num_attention_heads=6, num_key_value_heads=3,
                      head_dim=12, global_head_dim=28, num_global_key_value_heads=2, attention_k_eq_v=True,
                      sliding_window=7, layer_types=["sliding_attention", "full_attention", "full_attention"])


def unified_text_config(**overrides):
    from transformers import Gemma4UnifiedTextConfig

    kwargs = {k: v for k, v in GEMMA4_CONFIGS[TEXT].items()
              if k not in ("enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size")}
    kwargs.update(vocab_size=VOCAB, num_hidden_layers=len(kwargs["layer_types"]), final_logit_softcapping=30.0,
                  max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    kwargs.update(overrides)
    return Gemma4UnifiedTextConfig(**kwargs)


def build_unified(path: Path, seed: int = 0, vision: bool = True, audio: bool = True):
    """Save a tiny random Gemma4UnifiedForConditionalGeneration (tokenizer, processor config) at `path`;
    returns the transformers model (float32, eval)."""
    from transformers import (Gemma4UnifiedAudioConfig, Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration,
                              Gemma4UnifiedVisionConfig)

    ids = UNIFIED_TOKEN_IDS
    config = Gemma4UnifiedConfig(
        text_config=unified_text_config().to_dict(),
        vision_config=Gemma4UnifiedVisionConfig(**VISION).to_dict() if vision else None,
        audio_config=Gemma4UnifiedAudioConfig(audio_embed_dim=SAMPLES_PER_TOKEN).to_dict() if audio else None,
        boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"], image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"], audio_token_id=ids["<|audio|>"], boa_token_id=ids["<|audio>"],
        eoa_token_index=ids["<audio|>"])
    model = Gemma4UnifiedForConditionalGeneration(config)
    _randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # LayerNorm weights and biases away from 1 and 0, the position table at unit scale
        for name, p in model.named_parameters():
            if ".embed_vision." in name and (name.endswith("ln1.weight") or name.endswith("ln2.weight")
                                             or name.endswith("pos_norm.weight")):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
            elif ".embed_vision." in name and name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("pos_embedding"):
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    write_media_tokenizer(path)
    _add_audio_tokens(path)
    (path / "processor_config.json").write_text(json.dumps({
        "image_processor": {"max_soft_tokens": MAX_SOFT_TOKENS, "patch_size": VISION["patch_size"],
                            "pooling_kernel_size": VISION["pooling_kernel_size"]},
        "video_processor": {"max_soft_tokens": MAX_SOFT_TOKENS}}))
    return model.eval()


def _add_audio_tokens(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in AUDIO_TOKENS])
    assert all(tok.token_to_id(t) == UNIFIED_TOKEN_IDS[t] for t in AUDIO_TOKENS)
    tok.save(str(path / "tokenizer.json"))


@contextlib.contextmanager
def _without_torchvision():
    """Stub modules standing for torchvision while a transformers module that imports it is imported."""
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    added = [n for n in names if n not in sys.modules]
    class Stub(types.ModuleType):
        def __getattr__(self, name):  # annotations at class level name torchvision modules and types
            return Stub(name) if name[0].islower() else type(name, (), {})

    for n in added:
        sys.modules[n] = Stub(n)
    try:
        yield
    finally:
        for n in added:
            sys.modules.pop(n, None)


def reference_image_inputs(images, max_soft_tokens: int = MAX_SOFT_TOKENS):
    """(pixel_values [B, max_soft_tokens, 3·12·12], image_position_ids [B, max_soft_tokens, 2] with (-1, -1)
    padding, soft tokens per image), as Gemma4UnifiedImageProcessor makes them."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    with _without_torchvision():
        from transformers.models.gemma4_unified.image_processing_gemma4_unified import patches_merge

    k = VISION["pooling_kernel_size"]
    small = Gemma4ImageProcessorPil(patch_size=VISION["patch_size"], pooling_kernel_size=k,
                                    max_soft_tokens=max_soft_tokens)(images, return_tensors="pt")
    pixels, positions, counts = [], [], []
    for patches, pos in zip(small["pixel_values"], small["image_position_ids"]):
        valid = (pos != -1).all(-1)
        n = int(valid.sum()) // (k * k)
        merged, merged_pos = patches_merge(patches[valid][None], pos[valid][None], n)
        pad = max_soft_tokens - n
        pixels.append(torch.cat([merged[0], torch.zeros(pad, merged.shape[-1])]))
        positions.append(torch.cat([merged_pos[0], torch.full((pad, 2), -1, dtype=merged_pos.dtype)]))
        counts.append(n)
    return torch.stack(pixels), torch.stack(positions), counts


def reference_audio_inputs(waveforms):
    """input_features, input_features_mask as Gemma4UnifiedAudioFeatureExtractor makes them."""
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import Gemma4UnifiedAudioFeatureExtractor

    fe = Gemma4UnifiedAudioFeatureExtractor(feature_size=SAMPLES_PER_TOKEN, audio_samples_per_token=SAMPLES_PER_TOKEN)
    out = fe([np.asarray(w) for w in waveforms], return_tensors="pt")
    return out["input_features"], out["input_features_mask"]


def reference_audio_placeholder(features_mask, index: int = 0) -> str:
    """The text the reference processor puts for audio number `index` (Gemma4UnifiedProcessor.replace_audio_token)."""
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    fake = types.SimpleNamespace(boa_token="<|audio>", audio_token="<|audio|>", eoa_token="<audio|>")
    return Gemma4UnifiedProcessor.replace_audio_token(fake, {"input_features_mask": features_mask}, index)


def mm_token_type_ids(ids: torch.Tensor) -> torch.Tensor:
    """The processor's token types: 1 image, 2 video, 3 audio (only image/video attend both ways)."""
    t = UNIFIED_TOKEN_IDS
    return ((ids == t["<|image|>"]).long() + 2 * (ids == t["<|video|>"]).long()
            + 3 * (ids == t["<|audio|>"]).long())


def build_unified_assistant(path: Path, backbone_hidden_size: int, seed: int = 0):
    """Save a tiny random Gemma4UnifiedAssistantForCausalLM at `path` (a plain head); returns it."""
    from transformers import (Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM,
                              Gemma4UnifiedTextConfig)

    text = Gemma4UnifiedTextConfig(vocab_size=VOCAB, num_hidden_layers=len(ASSISTANT_TEXT["layer_types"]),
                                   final_logit_softcapping=30.0, max_position_embeddings=4096, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=2, **ASSISTANT_TEXT)
    config = Gemma4UnifiedAssistantConfig(text_config=text.to_dict(), backbone_hidden_size=backbone_hidden_size)
    with _assistant_sharing(), _unified_assistant_sharing():
        model = Gemma4UnifiedAssistantForCausalLM(config)
    _randomize(model, seed)
    model.save_pretrained(path)
    return model.eval()


@contextlib.contextmanager
def _unified_assistant_sharing():
    """assistant_reference._assistant_sharing for Gemma4UnifiedTextConfig (its own kv_sharing_modes)."""
    from transformers import Gemma4UnifiedTextConfig

    original = Gemma4UnifiedTextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    Gemma4UnifiedTextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        Gemma4UnifiedTextConfig.kv_sharing_modes = original


def mark_unified_producers(model) -> None:
    """mark_shared_kv_producers for the unified model's text decoder."""
    mark_shared_kv_producers(types.SimpleNamespace(model=model.model.language_model, config=model.config.text_config))

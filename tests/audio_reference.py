"""Tiny random Gemma 4 models with an audio tower (text + vision + audio) built with transformers, and test
waveforms (sine sweeps, noise, clipping) written with soundfile."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from reference import _randomize, gemma4_text_config
from vision_reference import MAX_SOFT_TOKENS, TOKEN_IDS, VISION, vision_config, write_media_tokenizer

# subsampling_conv_channels[0] must be 128: the reference sizes its input projection as channels[0] / 4
# x channels[1], which is the width of 128 mel bins after two halvings only when channels[0] is 128.
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 8],
             output_proj_dims=24, conv_kernel_size=5)
AUDIO_MARKS = ["<|audio>", "<audio|>"]  # begin / end of audio, added after vision_reference's media tokens
BOA, EOA = 269, 270


def audio_config(**overrides):
    from transformers import Gemma4AudioConfig

    return Gemma4AudioConfig(**{**AUDIO, **overrides})


def randomize_audio(model, seed: int) -> None:
    """Random weights (_randomize), plus what it leaves at its init: per_dim_scale (zeros), the subsampling
    norms, the output bias, and clipping bounds that do clip."""
    _randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 200)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("per_dim_scale") or name.endswith("output_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "subsample_conv_projection" in name and name.endswith("norm.weight"):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                buf.fill_(-2.0 - float(torch.rand((), generator=g)))
            elif name.endswith(("input_max", "output_max")):
                buf.fill_(2.0 + float(torch.rand((), generator=g)))


def build_audio_model(path: Path, seed: int = 0, text: str = "dense_kv", bidirectional: str | None = None,
                      audio: dict | None = None, **text_overrides):
    """Save a tiny random Gemma4ForConditionalGeneration with vision and audio towers (tokenizer and
    processor config beside it) at `path`; returns the transformers model (float32, eval)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text_cfg = gemma4_text_config(text, use_bidirectional_attention=bidirectional, **text_overrides)
    config = Gemma4Config(text_config=text_cfg.to_dict(), vision_config=vision_config().to_dict(),
                          audio_config=audio_config(**(audio or {})).to_dict(),
                          boi_token_id=TOKEN_IDS["<|image>"], eoi_token_id=TOKEN_IDS["<image|>"],
                          image_token_id=TOKEN_IDS["<|image|>"], video_token_id=TOKEN_IDS["<|video|>"],
                          audio_token_id=TOKEN_IDS["<|audio|>"], boa_token_id=BOA, eoa_token_index=EOA)
    model = Gemma4ForConditionalGeneration(config)
    randomize_audio(model, seed)
    model.save_pretrained(path)
    write_audio_tokenizer(path)
    (path / "processor_config.json").write_text(json.dumps({
        "image_processor": {"max_soft_tokens": MAX_SOFT_TOKENS, "patch_size": VISION["patch_size"],
                            "pooling_kernel_size": VISION["pooling_kernel_size"]},
        "video_processor": {"max_soft_tokens": MAX_SOFT_TOKENS},
        "feature_extractor": {"feature_size": 128, "sampling_rate": 16000}, "audio_seq_length": 750}))
    return model.eval()


def write_audio_tokenizer(path: Path) -> None:
    """vision_reference's tokenizer plus Gemma 4's begin/end-of-audio tokens (ids 269, 270)."""
    from tokenizers import AddedToken, Tokenizer

    write_media_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in AUDIO_MARKS])
    assert [tok.token_to_id(t) for t in AUDIO_MARKS] == [BOA, EOA]
    tok.save(str(path / "tokenizer.json"))


def sweep(seconds: float, rate: int = 16000, f0: float = 50.0, f1: float = 7000.0, amplitude: float = 0.6,
          channels: int = 1) -> np.ndarray:
    """A logarithmic sine sweep from f0 to f1 Hz (float32, [n] or [n, channels] with a phase per channel)."""
    t = np.arange(int(seconds * rate)) / rate
    k = np.log(f1 / f0) / max(seconds, 1e-9)
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    if channels == 1:
        return (amplitude * np.sin(phase)).astype(np.float32)
    return np.stack([amplitude * np.sin(phase + c) for c in range(channels)], axis=-1).astype(np.float32)


def encoded_audio(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()

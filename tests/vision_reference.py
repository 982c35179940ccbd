"""Tiny random multimodal Gemma 4 models (text decoder + vision tower) built with transformers, and
test images made with Pillow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from reference import _randomize, gemma4_text_config, write_byte_tokenizer

# Special tokens after the byte tokenizer's 259 (the texts are the model's own).
MEDIA_TOKENS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|image>", "<image|>", "<|image|>",
                "<|video|>", "<|audio|>"]
FIRST_MEDIA_ID = 259
TOKEN_IDS = {t: FIRST_MEDIA_ID + i for i, t in enumerate(MEDIA_TOKENS)}

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, patch_size=4, pooling_kernel_size=3, position_embedding_size=256)
MAX_SOFT_TOKENS = 70  # the smallest budget the reference processor accepts


def vision_config(**overrides):
    from transformers import Gemma4VisionConfig

    kwargs = dict(VISION, standardize=True, use_clipped_linears=True)
    kwargs.update(overrides)
    return Gemma4VisionConfig(**kwargs)


def build_multimodal(path: Path, name: str = "dense_kv", seed: int = 0, bidirectional: str | None = "vision",
                     vision: dict | None = None, **text_overrides):
    """Save a tiny random Gemma4ForConditionalGeneration (with tokenizer and processor config) at `path`;
    returns the transformers model (float32, eval)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = gemma4_text_config(name, use_bidirectional_attention=bidirectional, **text_overrides)
    config = Gemma4Config(text_config=text.to_dict(), vision_config=vision_config(**(vision or {})).to_dict(),
                          boi_token_id=TOKEN_IDS["<|image>"], eoi_token_id=TOKEN_IDS["<image|>"],
                          image_token_id=TOKEN_IDS["<|image|>"], video_token_id=TOKEN_IDS["<|video|>"],
                          audio_token_id=TOKEN_IDS["<|audio|>"])
    model = Gemma4ForConditionalGeneration(config)
    _randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        tower = model.model.vision_tower
        if tower.config.standardize:
            tower.std_bias.copy_(torch.randn(tower.std_bias.shape, generator=g))
            tower.std_scale.copy_(0.5 + torch.rand(tower.std_scale.shape, generator=g))
        for mod_name, buf in tower.named_buffers():
            # clipping bounds that do clip: unit-scale activations reach past 1.5 now and then
            if mod_name.endswith("input_min") or mod_name.endswith("output_min"):
                buf.fill_(-1.5 - float(torch.rand((), generator=g)))
            elif mod_name.endswith("input_max") or mod_name.endswith("output_max"):
                buf.fill_(1.5 + float(torch.rand((), generator=g)))
    model.save_pretrained(path)
    write_media_tokenizer(path)
    (path / "processor_config.json").write_text(json.dumps({
        "image_processor": {"max_soft_tokens": MAX_SOFT_TOKENS, "patch_size": VISION["patch_size"],
                            "pooling_kernel_size": VISION["pooling_kernel_size"]},
        "video_processor": {"max_soft_tokens": MAX_SOFT_TOKENS}}))
    return model.eval()


def write_media_tokenizer(path: Path) -> None:
    """The byte tokenizer of reference.py plus Gemma 4's turn, channel and media tokens (ids 259 on)."""
    from tokenizers import AddedToken, Tokenizer

    write_byte_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MEDIA_TOKENS])
    assert tok.token_to_id("<|audio|>") == TOKEN_IDS["<|audio|>"]
    tok.save(str(path / "tokenizer.json"))


def image_processor(max_soft_tokens: int = MAX_SOFT_TOKENS):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(patch_size=VISION["patch_size"], pooling_kernel_size=VISION["pooling_kernel_size"],
                                   max_soft_tokens=max_soft_tokens)


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A Pillow image with smooth gradients and noise (so resizing has something to do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-40, 40, size=base.shape)
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")
    return Image.fromarray(rgb, "RGB").convert(mode)


def encoded(image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG that declares width x height grey pixels and holds almost none (a decompression bomb's
    header: whoever decodes it before checking its size allocates width x height bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")

"""The 12B unified model's encoder-free embedders as llama.cpp ships them for GGUF users: the gemma4uv (image) and
gemma4ua (raw waveform) parts of an mmproj GGUF written by llama.cpp's own `convert_hf_to_gguf.py --mmproj` from a
tiny Gemma4UnifiedForConditionalGeneration. (llama.cpp's converter cannot write the tiny model's text GGUF: its
Gemma4Model asks for moe_intermediate_size, which a dense Gemma4UnifiedTextConfig lacks; gemma4's writer does.)"""

import numpy as np
import pytest
import torch

import gemma4
from gemma4.audio_io import Audio
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.checkpoint.unified import unified_media
from gemma4.checkpoint.unified_mmproj import MmprojUnifiedVisionCheckpoint, MmprojWaveformAudioCheckpoint
from gemma4.checkpoint.vision import MmprojCheckpoint
from gemma4.errors import ModelLoadError
from gemma4.images import from_pil
from gemma4.model.unified import load_embedder
from gemma4.info import count
from gguf_media import assert_mmproj_refusals, convert_mmproj, media_vocab_metadata, needs_converter
from unified_reference import AUDIO_TOKENS, UNIFIED_TOKEN_IDS, build_unified
from vision_reference import picture

pytestmark = needs_converter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("unified_gguf")
    build_unified(d / "hf", seed=5)
    mmproj = convert_mmproj(d / "hf", d / "mmproj.gguf")
    vocab = media_vocab_metadata({t: UNIFIED_TOKEN_IDS[t] for t in AUDIO_TOKENS})  # the unified model's audio marks
    text = write_gguf(open_checkpoint(d / "hf"), d / "text.gguf", "F32", vocab)
    return d, text, mmproj


def test_mmproj_embedders_equal_the_safetensors_ones(files):
    d, _, mmproj = files
    hf_vision, hf_audio = unified_media(open_checkpoint(d / "hf"))
    vision, audio = MmprojUnifiedVisionCheckpoint(mmproj, 44), MmprojWaveformAudioCheckpoint(mmproj, 44)
    # every number, from metadata and tensor shapes (the pooling kernel and the frame size from shapes alone);
    # the soft-token budgets are the processor's, which an mmproj does not carry: the defaults there
    budgets = dict(max_soft_tokens=280, video_max_soft_tokens=70)
    assert vision.config == type(hf_vision.config)(**{**hf_vision.config.__dict__, **budgets})
    assert audio.config == hf_audio.config
    a, b = (load_embedder(c, torch.float32, torch.device("cpu")) for c in (vision, hf_vision))
    side = vision.config.model_patch_size
    patches = torch.rand(30, 3 * side * side, generator=torch.Generator().manual_seed(0))
    positions = torch.randint(0, vision.config.mm_posemb_size, (30, 2), generator=torch.Generator().manual_seed(1))
    # F32 file, the converter's reorderings undone: the same weights in the same places, so the same bits
    assert torch.equal(a.encode(patches, positions), b.encode(patches, positions))
    a, b = (load_embedder(c, torch.float32, torch.device("cpu")) for c in (audio, hf_audio))
    frames = torch.randn(9, audio.config.audio_samples_per_token)
    assert torch.equal(a.encode(frames), b.encode(frames))


def test_text_gguf_with_mmproj_sees_and_hears_as_the_safetensors_model(files, float_products):
    d, text, mmproj = files
    from_gguf, from_hf = gemma4.load(text, mmproj=mmproj, progress=False), gemma4.load(d / "hf", progress=False)
    wave = (0.4 * np.random.default_rng(0).standard_normal(150)).astype(np.float32)
    media = [from_pil(picture(50, 37, seed=1)), Audio.from_array(wave)]
    # an image of 63 soft tokens, nine times the window of 7: it must see itself both ways on every layer
    # (the mmproj carries no processor budget: 70 soft tokens asked for, the HF folder's processor default here)
    prompt = from_gguf.multimodal_prompt("look <|image|> and listen <|audio|> then answer", media, image_tokens=70)
    # (the GGUF's own vocabulary: the one prompt serves both models)
    assert [p.soft_tokens for p in prompt.patches] == [63, 10]  # 150 samples: ceil(150 / 16) frames
    assert [prompt.ids[o] for o in prompt.offsets] == [UNIFIED_TOKEN_IDS["<|image|>"], UNIFIED_TOKEN_IDS["<|audio|>"]]
    # Both float32 with the same weights (F32 GGUF): only summation order may differ.
    torch.testing.assert_close(from_gguf.forward(prompt), from_hf.forward(prompt), atol=1e-5, rtol=0)


def test_mmproj_errors(files):
    d, text, mmproj = files
    for reader in (MmprojUnifiedVisionCheckpoint, MmprojWaveformAudioCheckpoint):
        assert_mmproj_refusals(reader, mmproj, text)
    with pytest.raises(ModelLoadError, match="'gemma4uv' is not supported"):
        MmprojCheckpoint(mmproj)  # the vision tower's reader (gemma4v) does not take the unified embedder


def test_info_of_the_12b_gguf(files, capsys):
    """`gemma4 info` on the unified model's text GGUF: its parameters (dense: all active) and KV at a context as the
    safetensors model's decoder has and a bf16 cache allocates."""
    from gemma4 import cli
    from gemma4.kv import KVBudget, KVCache

    d, text, _ = files
    cfg = open_checkpoint(d / "hf").config
    hf_decoder = gemma4.load(d / "hf", progress=False).decoder
    total = sum(p.numel() for p in hf_decoder.parameters())
    assert cli.main(["info", str(text), "--ctx", "64"]) == 0
    out = capsys.readouterr().out
    assert f"parameters     {count(total)} total, {count(total)} active per token" in out
    bf16 = KVCache(cfg, dtype=torch.bfloat16)  # one row, no tail: the rings info counts, without their positions
    positions = sum(layer.pos.numel() * layer.pos.element_size() for layer in bf16.layers if layer.ring)
    kv = bf16.ring_nbytes() - positions + 64 * KVBudget(10**12, bf16).per_token
    assert f"KV at     64   {kv / 1024:.1f} KiB (bf16)" in out
    assert "per-layer emb" not in out and "shared KV" not in out  # the 12B has neither


def test_info_describes_the_mmproj_parts(files, capsys):
    """`gemma4 info TEXT.gguf --mmproj FILE`: the image and waveform embedders read from llama.cpp's projector, with
    the parameters of the safetensors model's embedders."""
    from gemma4 import cli

    d, text, mmproj = files
    vision, audio = unified_media(open_checkpoint(d / "hf"))
    assert cli.main(["info", str(text), "--mmproj", str(mmproj), "--ctx", "64"]) == 0
    out = capsys.readouterr().out
    assert f"projector      {mmproj}" in out
    assert f"{count(vision.config.parameter_count())} parameters" in out.split("images")[1].splitlines()[0]
    samples = vision and audio.config.audio_samples_per_token
    assert (f"raw waveform: {samples} samples" in out
            and f"{count(audio.config.parameter_count())} parameters" in out.split("audio   ")[1].splitlines()[0])
    assert cli.main(["info", str(text), "--ctx", "64"]) == 0  # without it: the text model alone
    assert "images" not in capsys.readouterr().out

"""The audio tower as llama.cpp ships it for GGUF users: the gemma4a part of an mmproj GGUF, written by
llama.cpp's own `convert_hf_to_gguf.py --mmproj` from a tiny HF model."""

import base64

import pytest
import torch

import gemma4
from audio_reference import AUDIO_MARKS, BOA, EOA, build_audio_model, encoded_audio, sweep
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.audio import HFAudioCheckpoint, MmprojAudioCheckpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.model.audio import load_audio_tower
from gguf_media import assert_mmproj_refusals, convert_mmproj, media_vocab_metadata, needs_converter
from vision_reference import TOKEN_IDS

pytestmark = needs_converter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio_gguf")
    build_audio_model(d / "hf", seed=8)
    mmproj = convert_mmproj(d / "hf", d / "mmproj.gguf")
    text = write_gguf(open_checkpoint(d / "hf"), d / "text.gguf", "F32",
                      media_vocab_metadata(dict(zip(AUDIO_MARKS, (BOA, EOA)))))
    return d, text, mmproj


def test_mmproj_tower_equals_the_safetensors_tower(files):
    d, _, mmproj = files
    hf = HFAudioCheckpoint(open_checkpoint(d / "hf"))
    ours = MmprojAudioCheckpoint(mmproj, hf.config.text_hidden_size)
    assert ours.config == hf.config  # every number, from metadata and tensor shapes
    a = load_audio_tower(ours, torch.float32, torch.device("cpu"))
    b = load_audio_tower(hf, torch.float32, torch.device("cpu"))
    x = torch.randn(61, 128)
    assert torch.equal(a.encode(x), b.encode(x))  # F32 file: the same weights (softplus applied by both sides)


def test_text_gguf_with_mmproj_hears_as_the_safetensors_model(files):
    d, text, mmproj = files
    from_gguf, from_hf = gemma4.load(text, mmproj=mmproj), gemma4.load(d / "hf")
    wav = encoded_audio(sweep(0.9), 16000, "WAV", "PCM_16")
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "hi"}]}]
    prompt = from_gguf.chat_input(messages)  # the GGUF's own vocabulary: the one prompt serves both models
    n = prompt.patches[0].soft_tokens
    assert prompt.ids[prompt.offsets[0] - 1] == BOA and prompt.ids[prompt.offsets[0] + n] == EOA
    assert from_gguf.config.audio_token_id == TOKEN_IDS["<|audio|>"]  # found by its text in the GGUF vocabulary
    # Both float32 with the same weights (F32 GGUF): only summation order may differ.
    torch.testing.assert_close(from_gguf.forward(prompt), from_hf.forward(prompt), atol=1e-5, rtol=0)


def test_mmproj_errors(files):
    _, text, mmproj = files
    assert_mmproj_refusals(MmprojAudioCheckpoint, mmproj, text)


def test_info_describes_the_towers_alike(files, capsys):
    """`gemma4 info` of the text GGUF with its mmproj prints the image and audio towers the HF folder's info prints
    (but the image budget: the folder's processor_config.json has its own, an mmproj none), the audio tower's
    parameters being our AudioModel's."""
    import re

    from gemma4 import cli
    from gemma4.info import count
    from gemma4.model.audio import AudioModel

    d, text, mmproj = files

    def towers(*args):
        assert cli.main(["info", *args, "--ctx", "64"]) == 0
        return [re.sub(r"\(\d+ soft tokens per image by default\)", "", line)
                for line in capsys.readouterr().out.splitlines() if line.startswith(("images", "audio"))]

    hf = towers(str(d / "hf"))
    assert towers(str(text), "--mmproj", str(mmproj)) == hf and len(hf) == 2
    config = HFAudioCheckpoint(open_checkpoint(d / "hf")).config
    with torch.device("meta"):
        n = sum(p.numel() for p in AudioModel(config).parameters())
    assert f"{count(n)} parameters" in hf[1]

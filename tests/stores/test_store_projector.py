"""A projector (mmproj) a store keeps beside a GGUF becomes the model's vision tower, as --mmproj makes it."""

import os

import pytest
import torch

import gemma4
from gemma4 import store
from gguf_media import needs_converter, vision_gguf_pair
from reference import tiny_vocab_metadata
from store_layouts import hub_repo, lmstudio_model, ollama_model


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory):
    return vision_gguf_pair(tmp_path_factory.mktemp("store-vision"), tiny_vocab_metadata())


@pytest.fixture()
def stores(vision_files, tmp_path, monkeypatch):
    text, mmproj = vision_files
    ollama_model(tmp_path / "ollama", "g4v:tiny", text, projector=mmproj)
    hub_repo(tmp_path / "hub", "acme/g4v-GGUF", {"g4v-F32.gguf": text, "mmproj-g4v-F16.gguf": mmproj})
    lmstudio_model(tmp_path / "lms", "acme/g4v-local", {"g4v-F32.gguf": text, "mmproj-model-f16.gguf": mmproj})
    for var, sub in (("OLLAMA_MODELS", "ollama"), ("HF_HUB_CACHE", "hub"), ("LMSTUDIO_MODELS", "lms"),
                     ("GEMMA4_MODELS", "own")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return text, mmproj


@pytest.mark.parametrize("name", ["g4v:tiny", "acme/g4v-GGUF", "acme/g4v-local"])
def test_the_stores_projector_is_the_vision_tower(stores, name):
    text, mmproj = stores
    found = store.find(name)
    assert os.path.samefile(found.mmproj, mmproj)
    by_name, by_flag = gemma4.load(name), gemma4.load(text, mmproj=mmproj)
    by_name.check_vision()  # an image would be taken
    assert by_name.config.use_bidirectional_attention == by_flag.config.use_bidirectional_attention == "vision"
    tower, reference = by_name.vision.state_dict(), by_flag.vision.state_dict()
    assert tower.keys() == reference.keys() and all(torch.equal(tower[k], reference[k]) for k in tower)


def test_a_projector_this_engine_does_not_read_is_left_out(stores, tmp_path, monkeypatch):
    """A projector that is no gemma4v mmproj (another family's): the model still loads, as text only."""
    text, _ = stores
    ollama_model(tmp_path / "ollama", "g4v:other", text, projector=text)  # a GGUF that is no mmproj
    model = gemma4.load("g4v:other")
    with pytest.raises(ValueError, match="no vision tower"):
        model.check_vision()


@needs_converter
def test_the_stores_projector_brings_the_audio_tower(tmp_path, monkeypatch):
    """An E-model's mmproj kept beside it in a store (its gemma4a part): the model hears as with --mmproj."""
    import base64

    from audio_reference import AUDIO_MARKS, BOA, EOA, build_audio_model, encoded_audio, sweep
    from gemma4.checkpoint import open_checkpoint
    from gemma4.checkpoint.gguf_writer import write_gguf
    from gguf_media import convert_mmproj, media_vocab_metadata
    build_audio_model(tmp_path / "hf", seed=8)
    mmproj = convert_mmproj(tmp_path / "hf", tmp_path / "mmproj.gguf")
    text = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "text.gguf", "F32",
                      media_vocab_metadata(dict(zip(AUDIO_MARKS, (BOA, EOA)))))
    ollama_model(tmp_path / "ollama", "g4a:tiny", text, projector=mmproj)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("GEMMA4_MODELS", str(tmp_path / "own"))
    by_name, by_flag = gemma4.load("g4a:tiny"), gemma4.load(text, mmproj=mmproj)
    wav = encoded_audio(sweep(0.9), 16000, "WAV", "PCM_16")
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "hi"}]}]
    prompt = by_name.chat_input(messages)  # refused ("no audio tower") where the store's projector is not read
    assert torch.equal(by_name.forward(prompt), by_flag.forward(prompt))

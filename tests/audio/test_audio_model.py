"""A tiny Gemma 4 with vision and audio towers against transformers' Gemma4ForConditionalGeneration:
audio soft tokens placed as the processor places them, and float32 logits of a prompt holding an image
and an audio clip within 1e-4 of the reference's."""

import base64

import numpy as np
import pytest
import torch

import gemma4
from gemma4.errors import ModelLoadError
from audio_reference import BOA, EOA, build_audio_model, encoded_audio, sweep
from vision_reference import TOKEN_IDS, encoded, image_processor, picture

pytestmark = pytest.mark.usefixtures("float_products")  # parity with the float32 reference, images included

# float32 both ways, same math in another order (blocked vs band-masked attention is not involved: both
# use blocks; SDPA vs eager in the decoder): differences ~1e-6 on logits of size ~3. A misplaced soft
# token, a wrong mask (audio runs attending both ways) or a wrong weight moves logits by 1e-2 or more.
ATOL = 1e-4
AUDIO_ID = TOKEN_IDS["<|audio|>"]


CASES = {
    # bidirectional image attention on sliding layers (window 7): audio runs must stay causal all the same
    "no_ple": dict(text="dense_kv", bidirectional="vision"),
    # as E2B / E4B are: per-layer embeddings, causal image attention (runs once per-layer embeddings load)
    "ple": dict(text="dense_kv", bidirectional=None, hidden_size_per_layer_input=8),
}


@pytest.fixture(scope="module", params=list(CASES))
def mm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("audio_mm_" + request.param)
    ref = build_audio_model(path, seed=4, **CASES[request.param])
    try:
        model = gemma4.load(path)
    except ModelLoadError as e:
        if "per-layer embeddings" in str(e):
            pytest.skip("per-layer embeddings (Gemma 4 E2B/E4B) are not loadable on this branch yet")
        raise
    return path, ref, model


def _messages(wav: bytes, image) -> list:
    url = "data:image/png;base64," + base64.b64encode(encoded(image, "PNG")).decode()
    return [{"role": "user", "content": [
        {"type": "text", "text": "Listen"},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "and look"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "then say."}]}]


def _reference_inputs(prompt, waveform, image):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    audio = Gemma4AudioFeatureExtractor()([waveform], return_tensors="pt")
    pixels = image_processor()([image], return_tensors="pt")
    ids = torch.tensor([prompt.ids])
    # the processor's token types: 1 image, 3 audio (only image runs attend both ways)
    types = (ids == TOKEN_IDS["<|image|>"]).long() + 3 * (ids == AUDIO_ID).long()
    return dict(input_ids=ids, pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"],
                input_features=audio["input_features"], input_features_mask=audio["input_features_mask"],
                mm_token_type_ids=types)


def test_image_and_audio_in_one_prompt_give_the_reference_logits(mm, tmp_path):
    from transformers.audio_utils import load_audio

    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from types import SimpleNamespace
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    _, ref, model = mm
    wav = encoded_audio(sweep(1.3, rate=22050, channels=2), 22050, "WAV", "FLOAT")
    (tmp_path / "a.wav").write_bytes(wav)
    waveform = load_audio(str(tmp_path / "a.wav"), sampling_rate=16000, backend="soundfile")  # the reference's loader
    image = picture(30, 21, seed=5)
    prompt = model.chat_input(_messages(wav, image))

    n = Gemma4Processor._compute_audio_num_tokens(
        SimpleNamespace(feature_extractor=Gemma4AudioFeatureExtractor(), audio_seq_length=750), waveform, 16000)
    audio_at = prompt.ids.index(AUDIO_ID)
    assert prompt.ids[audio_at - 1] == BOA and prompt.ids[audio_at + n] == EOA and prompt.ids.count(AUDIO_ID) == n
    assert prompt.ids.index(TOKEN_IDS["<|image|>"]) > audio_at  # media in the order of the parts

    with torch.no_grad():
        out = ref(**_reference_inputs(prompt, waveform, image))
    expected = out.logits[0]
    got = model.forward(prompt)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.forward(prompt, chunk=5), expected, atol=ATOL, rtol=0)

    # greedy generation through the engine continues as the reference does
    reply = model.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True)
    with torch.no_grad():
        greedy = ref.generate(**_reference_inputs(prompt, waveform, image), max_new_tokens=4, do_sample=False)
    assert reply.token_ids == greedy[0, len(prompt.ids):].tolist()


def test_audio_runs_are_causal_even_with_bidirectional_images(mm):
    """Dropping the audio exception (audio runs both ways) changes the logits: the mask is exercised."""
    _, _, model = mm
    if model.config.use_bidirectional_attention != "vision":
        pytest.skip("images attend causally in this model: nothing to tell audio runs apart from")
    wav = encoded_audio(sweep(1.0), 16000, "WAV", "PCM_16")
    prompt = model.chat_input(_messages(wav, picture(21, 21, seed=1)))
    right = model.forward(prompt)
    model.config.audio_token_id = None
    try:
        assert (model.forward(prompt) - right).abs().max() > 1e-2
    finally:
        model.config.audio_token_id = AUDIO_ID


def test_bad_audio_and_models_without_audio(mm, gemma4_models):
    _, _, model = mm
    with pytest.raises(ValueError, match="cannot decode the audio"):
        model.chat_input(_messages(b"RIFF....WAVEnot really", picture(9, 9)))
    with pytest.raises(ValueError, match="too long"):
        model.chat_input(_messages(encoded_audio(np.zeros(31 * 8000, np.float32), 8000, "WAV", "PCM_16"), picture(9, 9)))
    with pytest.raises(ValueError, match="too short"):
        model.chat_input(_messages(encoded_audio(np.zeros(40, np.float32), 16000, "WAV", "PCM_16"), picture(9, 9)))
    path, _ = gemma4_models["dense_kv"]
    text_only = gemma4.load(path)
    wav = encoded_audio(sweep(0.5), 16000, "WAV", "PCM_16")
    with pytest.raises(ValueError, match="no audio tower"):
        text_only.chat_input([{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]}])


def test_a_repeated_clip_is_encoded_once(mm, monkeypatch):
    """The same clip twice in a conversation goes through the tower once (cached by its samples' digest),
    and both runs get the same embeddings; another clip is encoded on its own."""
    _, _, model = mm
    calls = []
    tower = model.audio
    real = tower.encode
    monkeypatch.setattr(tower, "encode", lambda f: calls.append(f.shape[0]) or real(f))
    model._encoded.clear()
    a, b = encoded_audio(sweep(0.6), 16000, "WAV", "PCM_16"), encoded_audio(sweep(0.6, f0=90), 16000, "WAV", "PCM_16")
    part = lambda data: {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(),
                                                                "format": "wav"}}
    prompt = model.chat_input([{"role": "user", "content": [part(a), part(b), part(a)]}])
    soft = model.media_embeddings(prompt)
    assert len(soft) == 3 and len(calls) == 2
    assert torch.equal(soft[0][1], soft[2][1]) and not torch.equal(soft[0][1], soft[1][1])

"""Audio through the OpenAI API: input_audio content parts (base64 wav / mp3), sent with the openai client."""

import base64

import httpx
import numpy as np
import openai
import pytest

import gemma4
from audio_reference import build_audio_model, encoded_audio, sweep
from gemma4.server import create_app
from test_server import LiveServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio_srv")
    build_audio_model(path, seed=6)
    model = gemma4.load(path)
    server = LiveServer(create_app(model, model_name="am", max_batch=2))
    yield model, server
    server.stop()


def _part(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


@pytest.mark.parametrize("fmt,subtype", [("wav", "PCM_16"), ("mp3", "MPEG_LAYER_III")])
def test_input_audio_gives_what_the_engine_gives(live, fmt, subtype):
    model, server = live
    data = encoded_audio(sweep(1.1, rate=24000), 24000, fmt.upper(), subtype)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, _part(data, fmt)]}]
    r = server.client().chat.completions.create(model="am", messages=messages, max_tokens=5, temperature=0)
    expected = model.generate(model.chat_input(messages), max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == expected.prompt_tokens > 27  # 1.1 s is 28 soft tokens, all in the prompt
    assert r.choices[0].message.content == expected.text


@pytest.mark.parametrize("part,words", [
    (_part(b"definitely not a sound file", "wav"), "not audio"),
    (_part(encoded_audio(sweep(1.0), 16000, "WAV", "PCM_16")[:9000], "wav"), "truncated"),
    (_part(encoded_audio(np.zeros(31 * 8000, np.float32), 8000, "WAV", "PCM_16"), "wav"), "too long"),
    ({"type": "input_audio", "input_audio": {"data": "%%% not base64 %%%", "format": "wav"}}, "malformed"),
    ({"type": "input_audio", "input_audio": {"format": "wav"}}, "base64-encoded audio is needed"),
    (_part(encoded_audio(sweep(0.5), 16000, "WAV", "PCM_16"), "aac"), "not supported"),
])
def test_bad_audio_is_400_and_the_server_keeps_serving(live, part, words):
    _, server = live
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="am", max_tokens=2,
                                                messages=[{"role": "user", "content": [part]}])
    assert words in e.value.body["message"] if isinstance(e.value.body, dict) else words in str(e.value)
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_a_model_without_audio_refuses_it(tmp_path_factory):
    from vision_reference import build_multimodal

    path = tmp_path_factory.mktemp("no_audio")
    build_multimodal(path, seed=2)
    server = LiveServer(create_app(gemma4.load(path), model_name="v"))
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "user", "content": [_part(encoded_audio(sweep(0.5), 16000, "WAV", "PCM_16"), "wav")]}]})
        assert r.status_code == 400 and "no audio tower" in r.json()["error"]["message"], r.text
    finally:
        server.stop()

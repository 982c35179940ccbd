"""`gemma4 run --audio` and `/audio` in `gemma4 chat`, run as a user runs them."""

import pytest

import gemma4
from audio_reference import build_audio_model, encoded_audio, sweep
from commands import assert_chat_saw_media, assert_refused, assert_run_answers, cli, media_message
from vision_reference import build_multimodal, encoded, picture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio_cli")
    build_audio_model(d / "model", seed=12)
    (d / "a.flac").write_bytes(encoded_audio(sweep(1.4, rate=44100, channels=2), 44100, "FLAC", "PCM_16"))
    (d / "b.mp3").write_bytes(encoded_audio(sweep(0.8, rate=16000, f0=200), 16000, "MP3", "MPEG_LAYER_III"))
    (d / "broken.wav").write_bytes(encoded_audio(sweep(1.0), 16000, "WAV", "PCM_16")[:5000])
    (d / "a.png").write_bytes(encoded(picture(30, 30, seed=1), "PNG"))
    return d


def test_run_with_audio(tiny):
    r = cli("run", "-m", str(tiny / "model"), "--audio", str(tiny / "a.flac"), "--audio", str(tiny / "b.mp3"),
            "--temperature", "0", "-n", "4", "transcribe")
    assert_run_answers(r, gemma4.load(tiny / "model"), media_message(tiny, "transcribe", "a.flac", "b.mp3"), 4)


@pytest.mark.parametrize("args,words", [
    (["--audio", "{d}/broken.wav"], "truncated"),  # the decoder's other refusals: tests/audio/test_audio_io.py
    (["--audio", "{d}/a.flac", "--raw"], "drop --raw"),
])
def test_bad_audio_is_one_line_and_exit_2(tiny, args, words):
    assert_refused(cli("run", "-m", str(tiny / "model"), *[a.format(d=tiny) for a in args], "x"), words)


def test_a_model_without_audio_refuses_it(tiny):
    build_multimodal(tiny / "vision_only", seed=1)
    assert_refused(cli("run", "-m", str(tiny / "vision_only"), "--audio", str(tiny / "b.mp3"), "x"), "no audio tower")


def test_chat_audio_command(tiny):
    r = cli("chat", "-m", str(tiny / "model"), "--temperature", "0", "-n", "6",
            input=f"/audio {tiny / 'a.flac'}\n/image {tiny / 'a.png'}\nwhat now\n/audio {tiny / 'missing.wav'}\n")
    assert r.returncode == 0, r.stderr
    assert "(2 attached to your next message)" in r.stderr and "no such audio file" in r.stderr
    assert_chat_saw_media(r.stdout, gemma4.load(tiny / "model"), media_message(tiny, "what now", "a.flac", "a.png"), 6)


def test_info_describes_the_audio_tower(tiny):
    from transformers import AutoConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4MultimodalEmbedder

    config = AutoConfig.from_pretrained(tiny / "model")
    n = sum(p.numel() for m in (Gemma4AudioModel(config.audio_config),
                                Gemma4MultimodalEmbedder(config.audio_config, config.text_config))
            for p in m.parameters())
    r = cli("info", str(tiny / "model"))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("audio tower"))
    assert "2 conformer layers, hidden 32" in line and f"{n / 1e3:.2f}K parameters" in line, (line, n)

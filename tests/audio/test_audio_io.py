"""Decoding WAV, FLAC, MP3 and OGG against transformers' audio loader (soundfile backend), and one clear
error for anything that is not usable audio."""

import base64

import numpy as np
import pytest

from audio_reference import encoded_audio, sweep
from gemma4.audio_io import decode_audio, decode_base64_audio, load_audio
from gemma4.errors import AudioError

FORMATS = [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]


@pytest.mark.parametrize("fmt,subtype", FORMATS)
@pytest.mark.parametrize("rate", [16000, 22050])
def test_formats_decode_as_the_reference_loader_does(tmp_path, fmt, subtype, rate):
    from transformers.audio_utils import load_audio as reference_load

    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(encoded_audio(sweep(1.2, rate=rate, channels=2), rate, fmt, subtype))
    ours = load_audio(path)
    assert ours.sampling_rate == 16000 and ours.samples.dtype == np.float32
    np.testing.assert_array_equal(ours.samples, reference_load(str(path), sampling_rate=16000, backend="soundfile"))
    again = decode_base64_audio(base64.b64encode(path.read_bytes()).decode())
    assert again.digest == ours.digest


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_bad_audio_gives_one_clear_line(tmp_path):
    wav = encoded_audio(sweep(1.0), 16000, "WAV", "PCM_16")
    mp3 = encoded_audio(sweep(1.0), 16000, "MP3", "MPEG_LAYER_III")
    cases = {
        b"": "empty",
        b"this is plain text, not a sound": "not audio",
        wav[:len(wav) // 2]: "truncated",
        mp3[:len(mp3) // 2]: "truncated",
        encoded_audio(np.zeros(31 * 8000, np.float32), 8000, "WAV", "PCM_16"): "too long",
        encoded_audio(np.full(1000, np.nan, np.float32), 16000, "WAV", "FLOAT"): "non-finite",
        encoded_audio(sweep(0.5), 16000, "AIFF", "PCM_16"): "not supported",
    }
    for data, words in cases.items():
        with pytest.raises(AudioError) as e:
            decode_audio(data)
        assert words in one_line(e), (words, str(e.value))
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="malformed"):
        decode_base64_audio("not base64 at all!!")
    with pytest.raises(AudioError, match="not audio"):
        decode_base64_audio("data:image/png;base64," + base64.b64encode(wav).decode())
    assert decode_base64_audio("data:audio/wav;base64," + base64.b64encode(wav).decode()).seconds == 1.0

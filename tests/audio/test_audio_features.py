"""Log-mel features and soft-token counts against transformers' Gemma4AudioFeatureExtractor and
Gemma4Processor, over sweeps, silence, clipping, odd lengths and resampled input."""

from types import SimpleNamespace

import numpy as np
import pytest

from audio_reference import encoded_audio, sweep
from gemma4.audio_features import FeatureConfig, FeatureExtractor
from gemma4.audio_io import decode_audio


@pytest.fixture(scope="module")
def reference():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


def reference_tokens(extractor, waveform) -> int:
    """The processor's own count of soft tokens for a waveform (its arithmetic, unbound)."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    return Gemma4Processor._compute_audio_num_tokens(
        SimpleNamespace(feature_extractor=extractor, audio_seq_length=750), waveform, 16000)


def assert_features_match(reference, waveform):
    ref = reference([waveform], return_tensors="np")
    ours = FeatureExtractor()(waveform)
    np.testing.assert_array_equal(ours.mask, ref["input_features_mask"][0])
    # The same numpy operations in the same precision (float32 frames and FFT, float64 filter bank and
    # log): equal up to summation order, which moves a float32 log-mel value (|v| < 20) by ~1e-6 at most.
    np.testing.assert_allclose(ours.values, ref["input_features"][0], rtol=0, atol=1e-5)
    assert ours.soft_tokens == reference_tokens(reference, waveform)


@pytest.mark.parametrize("seconds", [0.02, 0.5, 1.0, 2.3456, 7.0])
def test_sine_sweeps(reference, seconds):
    assert_features_match(reference, sweep(seconds))


def test_silence_noise_and_clipping(reference):
    assert_features_match(reference, np.zeros(16000, np.float32))  # log(mel_floor) everywhere
    rng = np.random.default_rng(0)
    assert_features_match(reference, (rng.standard_normal(12345) * 0.1).astype(np.float32))
    assert_features_match(reference, np.clip(sweep(1.5, amplitude=3.0), -1.0, 1.0))  # square-ish, rich in harmonics


@pytest.mark.parametrize("rate,channels", [(8000, 1), (48000, 1), (16000, 2), (44100, 2)])
def test_resampled_and_stereo_input(reference, tmp_path, rate, channels):
    """A WAV at another rate, or stereo: decoded and resampled as transformers' audio loader does it
    (soundfile + soxr), then the same features."""
    from transformers.audio_utils import load_audio

    path = tmp_path / "clip.wav"
    path.write_bytes(encoded_audio(sweep(1.7, rate=rate, f1=min(7000, rate / 2 - 100), channels=channels), rate, "WAV",
                                   "FLOAT"))
    theirs = load_audio(str(path), sampling_rate=16000, backend="soundfile")
    ours = decode_audio(path.read_bytes())
    np.testing.assert_array_equal(ours.samples, theirs)
    assert_features_match(reference, ours.samples)


def test_too_short_for_a_frame_gives_no_tokens(reference):
    assert FeatureExtractor()(np.zeros(10, np.float32)).soft_tokens == reference_tokens(reference, np.zeros(10)) == 0


def test_unsupported_extractor_options_are_refused():
    with pytest.raises(ValueError, match="preemphasis"):
        FeatureConfig.from_dict({"preemphasis": 0.97})
    assert FeatureConfig.from_dict({"feature_size": 128, "preemphasis": 0.0}).fft_length == 512
